"""Checksummed chunks and ``jacrun verify``: a flipped byte is found, named, repaired, recomputed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import jacrun
from jacrun.checksum import ChecksumError
from jacrun.cli import app
from tests.helpers import job_config, write_config

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def chunk_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("c/**/*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, scheduler_address):
    """A finished 4 x 2 block job (vjp, 4 vectors, 2 per block) and its chunk files' bytes."""
    config = job_config(
        vectors={"kind": "random", "count": 4, "seed": 2}, chunks={"samples": 32, "vectors": 2}
    )
    cfg = jacrun.load_config(write_config(tmp_path, config))
    assert jacrun.submit(cfg, scheduler=scheduler_address, progress=False).ok
    store = Path(cfg.output.store)
    return cfg, store, chunk_files(store)


def flip(path: Path, at: int = 9) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_array_carries_a_crc32c_and_a_flipped_byte_fails_naming_its_chunk(finished):
    cfg, store, _ = finished
    group = zarr.open_group(str(store), mode="r")
    for name in ("vjp", "y", "_blocks"):
        assert group[name].metadata.codecs[-1].to_dict() == {"name": "crc32c"}, name
    flip(store / "vjp" / "c" / "2" / "1" / "0")
    with pytest.raises(ChecksumError, match=r"chunk c/2/1/0 of array vjp in .*out\.zarr"):
        _ = jacrun.load(store).vjp.values


def test_verify_finds_the_one_damaged_block_and_repair_plus_rerun_restores_it(finished, scheduler_address):
    cfg, store, before = finished
    assert invoke("verify", str(store)).exit_code == 0
    flip(store / "vjp" / "c" / "2" / "1" / "0")
    result = invoke("verify", str(store))
    assert result.exit_code == 1, result.output
    assert re.findall(r"damaged block \((\d+), (\d+)\)", result.output) == [("2", "1")]
    assert "vjp chunk 2/1/0 corrupted" in result.output

    result = invoke("verify", str(store), "--repair")
    assert result.exit_code == 1 and "cleared the markers of 1 block" in result.output
    marks = zarr.open_group(str(store), mode="r")["_blocks"][...]
    assert marks.sum() == marks.size - 1 and marks[2, 1] == 0

    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert summary.ok and summary.blocks_run == 1
    assert chunk_files(store) == before  # bit-identical, every chunk and marker
    assert invoke("verify", str(store)).exit_code == 0


def test_verify_finds_a_missing_chunk_and_a_corrupted_marker_on_the_cluster(finished, scheduler_address):
    cfg, store, _ = finished
    (store / "y" / "c" / "3" / "0").unlink()  # y belongs to the blocks (i, 0)
    flip(store / "_blocks" / "c" / "1" / "1", at=0)
    for command in ("status", "show"):  # a corrupted marker: one line naming it, not a traceback
        result = invoke(command, str(store))
        assert result.exit_code == 2 and "corrupted chunk c/1/1 of array _blocks" in result.output, (
            result.output
        )
        assert f"jacrun verify {store} --repair" in result.output
    result = invoke("verify", str(store), "--scheduler", scheduler_address)
    assert result.exit_code == 1, result.output
    assert re.findall(r"damaged block \((\d+), (\d+)\)", result.output) == [("1", "1"), ("3", "0")]
    assert "y chunk 3/0 missing" in result.output and "marker chunk 1/1 corrupted" in result.output
    assert invoke("verify", str(store), "--repair").exit_code == 1
    marks = zarr.open_group(str(store), mode="r")["_blocks"][...]
    assert marks[1, 1] == 0 and marks[3, 0] == 0 and marks.sum() == marks.size - 2


def test_verify_bad_input_exits_2(tmp_path):
    (tmp_path / "folder").mkdir()
    for target in (tmp_path / "folder", tmp_path / "absent"):
        result = invoke("verify", str(target))
        assert result.exit_code == 2 and "not a jacrun store" in result.output, result.output
    result = invoke("verify", str(tmp_path / "folder"), "--scheduler", "nonsense")
    assert result.exit_code == 2 and "--scheduler" in result.output


def test_unmarked_blocks_are_not_damage(finished):
    _, store, _ = finished
    group = zarr.open_group(str(store), mode="r+")
    group["_blocks"][0, 0] = 0
    (store / "vjp" / "c" / "0" / "0" / "0").unlink()
    result = invoke("verify", str(store))
    assert result.exit_code == 0 and "7/8 blocks done" in result.output, result.output
    with pytest.warns(jacrun.store.IncompleteWarning):
        assert np.isnan(jacrun.load(store).vjp.values[:32, :2]).all()


def test_a_store_written_before_checksums_is_read_resumed_and_verified_with_a_warning(
    tmp_path, scheduler_address, monkeypatch
):
    from jacrun import checksum

    monkeypatch.setattr(checksum, "with_checksum", lambda compressors: compressors)  # the old layout
    cfg = jacrun.load_config(write_config(tmp_path, job_config()))
    store = Path(cfg.output.store)
    assert jacrun.submit(cfg, scheduler=scheduler_address, progress=False).ok
    monkeypatch.undo()
    assert not checksum.has_checksum(zarr.open_group(str(store), mode="r")["vjp"])
    zarr.open_group(str(store), mode="r+")["_blocks"][1, 0] = 0
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert summary.ok and summary.blocks_run == 1  # resumed in its own (unchecksummed) layout
    result = invoke("verify", str(store))
    assert result.exit_code == 0 and "carry no checksums" in result.output, result.output
