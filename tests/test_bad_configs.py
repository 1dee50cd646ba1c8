"""The bad-input corpus: every file in tests/bad_configs/ must be refused by ``jacrun submit``.

Each file starts with comment lines:

    # expect: <regex the message must match>        (required)
    # setup: <name>                                 (optional: a fixture from SETUPS below)
    # args: <extra command-line arguments>          (optional, shell-split)

The test copies the file into a fresh folder, runs the setup, snapshots every file there
(names and bytes), runs the real CLI, and asserts: exit code 2, the expected message, one
``error:`` line and no traceback, no cluster started or contacted, and the folder unchanged
byte for byte (no store created; a store or a foreign folder already there left as it was).

No cluster is started: ``jacrun.runner.connect`` (the only way the runner reaches a cluster)
is replaced by a function that fails the test, and most configs name a scheduler at
``tcp://127.0.0.1:9`` where nothing listens, so a config error reported as such was found
before any connection was tried.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jacrun.cli import app

CORPUS = Path(__file__).parent / "bad_configs"
CASES = sorted(CORPUS.glob("*.yaml"))
HEADER = re.compile(r"#\s*(expect|setup|args):\s?(.*)$")


def header(path: Path) -> dict[str, str]:
    """The ``# key: value`` lines at the top of a corpus file."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = HEADER.match(line)
        if not match:
            break
        found[match.group(1)] = match.group(2).strip()
    return found


# ---- setups: files a bad config refers to, created next to it --------------------------------


def _save(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / name, array)


def _make_store(config: Path, overrides: list[str]) -> None:
    """A real jacrun store (created, no block run) for the config with ``overrides``."""
    from jacrun.config import load_config
    from jacrun.prepare import prepare
    from jacrun.runner import open_output

    open_output(prepare(load_config(config, overrides)))


def _foreign_folder(folder: Path) -> None:
    out = folder / "out.zarr"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("my thesis results, not a jacrun store\n")
    (out / "data" / "results.csv").write_bytes(b"a,b\n1,2\n\x00\xff")


def _foreign_zarr(folder: Path) -> None:
    import zarr

    group = zarr.open_group(str(folder / "out.zarr"), mode="w")
    group.attrs["owner"] = "someone else"
    group.create_array("x", shape=(4, 3), dtype="float64")[:] = np.arange(12.0).reshape(4, 3)


def _zarr_group(folder: Path) -> None:
    import zarr

    group = zarr.open_group(str(folder / "x.zarr"), mode="w")
    group.create_array("x", shape=(10, 5), dtype="float64")[:] = 1.0


def _corrupt_zarr(folder: Path) -> None:
    (folder / "x.zarr").mkdir()
    (folder / "x.zarr" / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_type": \x00\xff garbage')


SETUPS: dict[str, Callable[[Path, Path], None]] = {
    "garbage_npy": lambda d, c: (d / "x.npy").write_bytes(b"\x93NUMPY garbage, not an array\x00\x01\x02"),
    "corrupt_zarr": lambda d, c: _corrupt_zarr(d),
    "zarr_group": lambda d, c: _zarr_group(d),
    "x_10x7": lambda d, c: _save(d, "x.npy", np.ones((10, 7))),
    "x_3d": lambda d, c: _save(d, "x.npy", np.ones((10, 5, 1))),
    "x_complex": lambda d, c: _save(d, "x.npy", np.ones((10, 5), dtype=complex)),
    "x_empty": lambda d, c: _save(d, "x.npy", np.ones((0, 5))),
    "x20_v30": lambda d, c: (_save(d, "x.npy", np.ones((20, 5))), _save(d, "v.npy", np.ones((30, 2, 3)))),
    "v_width_5": lambda d, c: _save(d, "v.npy", np.ones((100, 2, 5))),
    "v_width_3": lambda d, c: _save(d, "v.npy", np.ones((100, 2, 3))),
    "v_shared_3d": lambda d, c: _save(d, "v.npy", np.ones((2, 2, 3))),
    "v_strings": lambda d, c: _save(d, "v.npy", np.full((100, 3), "a")),
    "v_zero_k": lambda d, c: _save(d, "v.npy", np.ones((100, 0, 3))),
    "v_90_rows": lambda d, c: _save(d, "v.npy", np.ones((90, 3))),
    "weights_garbage": lambda d, c: (d / "w.npz").write_bytes(b"PK\x03\x04 not really a zip archive"),
    "weights_transposed": lambda d, c: np.savez(
        d / "w.npz", W0=np.ones((5, 8)), b0=np.ones(8), W1=np.ones((3, 8)), b1=np.ones(3)
    ),
    "matrix_1d": lambda d, c: _save(d, "a.npy", np.ones(5)),
    "matrix_empty_file": lambda d, c: (d / "a.npy").write_bytes(b""),
    "x_csv_text": lambda d, c: (d / "x.npy").write_text("1,2,3,4,5\n6,7,8,9,10\n"),
    "foreign_folder": lambda d, c: _foreign_folder(d),
    "foreign_zarr": lambda d, c: _foreign_zarr(d),
    "foreign_file": lambda d, c: (d / "out.zarr").write_text("a file where the store would go\n"),
    "store_chunked_50": lambda d, c: _make_store(c, ["chunks.samples=50"]),
    "store_other_seed": lambda d, c: _make_store(c, ["vectors.seed=9"]),
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder``: bytes for files, None for folders."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def no_cluster(monkeypatch):
    """Fail the test if the runner tries to start or reach a cluster."""

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started or contacted for a bad config")

    monkeypatch.setattr("jacrun.runner.connect", refuse)


def test_the_corpus_is_complete():
    assert len(CASES) >= 25
    for path in CASES:
        info = header(path)
        assert "expect" in info, f"{path.name}: no '# expect:' line"
        re.compile(info["expect"])
        assert info.get("setup") in {None, *SETUPS}, f"{path.name}: unknown setup {info['setup']!r}"


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_bad_config_is_refused_cleanly(case: Path, tmp_path: Path, no_cluster):
    info = header(case)
    config = tmp_path / case.name
    shutil.copyfile(case, config)
    if "setup" in info:
        SETUPS[info["setup"]](tmp_path, config)
    before = snapshot(tmp_path)

    args = ["submit", str(config), *shlex.split(info.get("args", ""))]
    result = CliRunner().invoke(app, args)
    output = result.output

    assert result.exit_code == 2, f"exit {result.exit_code}: {output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert re.search(info["expect"], output), f"expected /{info['expect']}/ in:\n{output}"
    assert [line.startswith("error: ") for line in output.splitlines()].count(True) == 1, output
    assert "Traceback" not in output
    assert snapshot(tmp_path) == before, "the folder changed: a store was created or modified"


def test_missing_config_file(tmp_path, no_cluster):
    result = CliRunner().invoke(app, ["submit", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert re.search(r"absent\.yaml: cannot read the config", result.output), result.output
    assert list(tmp_path.iterdir()) == []


def test_config_is_a_folder(tmp_path, no_cluster):
    (tmp_path / "job.yaml").mkdir()
    result = CliRunner().invoke(app, ["submit", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2
    assert re.search(r"job\.yaml: cannot read the config", result.output), result.output
    assert "Traceback" not in result.output
