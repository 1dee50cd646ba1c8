"""A full disk, for real: stores on a small tmpfs (mounted here as root; skipped otherwise, except
under CI=true). A job that cannot fit is refused before anything is written; a disk that fills
while a job runs stops it at the first refused write, in one line, losing nothing, and a rerun
completes it."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import jacrun
from jacrun.cli import app
from tests.helpers import REPO, job_config, markers_done, write_config

runner = CliRunner()


def invoke(*args: str):
    """The real command, in process (its stdout and stderr apart)."""
    return runner.invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def error_lines(result) -> list[str]:
    """The non-empty stderr lines of a command that exited on purpose (no traceback)."""
    assert isinstance(result.exception, SystemExit | None) and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at ``tmp_path/disk``, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def big_job(store: Path, compression: str) -> dict:
    """About 9 MiB of float32 VJPs of random inputs: more than the disk holds, compressed or not."""
    return job_config(
        str(store),
        function={"kind": "mlp", "sizes": [32, 16, 4], "seed": 0},
        inputs={"kind": "random", "samples": 18000, "seed": 1},
        vectors={"kind": "random", "count": 4},
        output={"store": str(store), "dtype": "float32", "compression": compression},
        chunks={"samples": 2000},
    )


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_job_larger_than_the_free_space_is_refused_before_anything_is_written(
    tmp_path, small_disk, compression
):
    config = write_config(tmp_path, big_job(small_disk / "out.zarr", compression))
    for command in ("validate", "submit"):
        result = invoke(command, str(config))
        assert result.exit_code == 2, result.output
        (line,) = error_lines(result)
        assert re.search(r"job\.yaml:\d+: output\.store: the job needs about \d+\.\d MiB", line), line
        assert re.search(rf"but {re.escape(str(small_disk))} has 4\.0 MiB free", line), line
        assert ("zstd keeps 9" in line) == (compression == "zstd"), line
        assert os.listdir(small_disk) == []
    fits = invoke("validate", str(config), "--set", "inputs.samples=2000")
    assert fits.exit_code == 0, fits.output


def filling_job(tmp_path: Path, store: Path, flags: Path) -> dict:
    """Tripwire (y = sin x) on 100 rows in blocks of 20; block 2 (rows 40:60) fills the disk."""
    x = np.random.default_rng(0).normal(size=(100, 3))
    x[45, 0] = 999.0
    np.save(tmp_path / "x.npy", x)
    function = {
        "kind": "python",
        "target": "tests.plugins:Tripwire",
        "path": str(REPO),
        "params": {"n": 3, "action": "fill", "flag_dir": str(flags)},
    }
    return job_config(
        str(store),
        function=function,
        inputs={"kind": "npy", "path": str(tmp_path / "x.npy")},
        vectors={"kind": "random", "count": 2},
        chunks={"samples": 20},
    )


def test_a_disk_that_fills_stops_the_job_once_and_a_rerun_completes_it(
    tmp_path, small_disk, scheduler_address
):
    reference = jacrun.config_from_dict(filling_job(tmp_path, tmp_path / "ref.zarr", tmp_path), tmp_path)
    assert jacrun.submit(reference, scheduler=scheduler_address, progress=False).ok

    flags = small_disk / "flags"
    flags.mkdir()
    (flags / "armed").write_text("")
    store = small_disk / "out.zarr"
    config = write_config(tmp_path / "job", filling_job(tmp_path, store, flags))
    stopped = invoke("submit", str(config), "--scheduler", scheduler_address)
    assert stopped.exit_code == 1, stopped.output
    lines = error_lines(stopped)
    assert len(lines) == 1, lines
    assert re.match(
        r"stopped: .*out\.zarr: the store's file system is full \(No space left on device", lines[0]
    )
    assert "blocks are done and kept. Free space" in lines[0] and "rerun the same command" in lines[0]
    assert "failed: block" not in stopped.stdout  # no line per block
    done = markers_done(store)
    assert done < 5

    verify = invoke("verify", str(store))
    assert verify.exit_code == 0, verify.output
    (flags / "filler").unlink()
    (flags / "armed").unlink()
    again = invoke("submit", str(config), "--scheduler", scheduler_address, "--quiet")
    assert again.exit_code == 0, again.output
    runs = zarr.open_group(str(store), mode="r").attrs["jacrun"]["runs"]
    assert runs[-1]["blocks_computed"] == 5 - done  # finished blocks were not recomputed
    ours, theirs = (
        zarr.open_group(str(store), mode="r"),
        zarr.open_group(str(tmp_path / "ref.zarr"), mode="r"),
    )
    for name in ("vjp", "y"):
        np.testing.assert_array_equal(ours[name][...], theirs[name][...])
