"""``jacrun validate`` refuses what ``submit`` refuses before it starts a cluster, and writes nothing.

Each case builds the situation on disk, then runs both commands through Typer's CliRunner
(the real command in process): the same exit code and the same one-line message, and
``validate`` leaves every file as it found it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jacrun.cli import app
from jacrun.config import load_config
from jacrun.prepare import prepare
from jacrun.runner import open_output
from tests.helpers import job_config, run_cli, write_config

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (ns)."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_store(config: Path, *overrides: str) -> None:
    """This job's store, created as submit creates it (no block run, no cluster)."""
    open_output(prepare(load_config(config, list(overrides)), calibrate=False))


def foreign_folder(tmp_path: Path, config: Path) -> list[str]:
    (tmp_path / "out.zarr").mkdir()
    (tmp_path / "out.zarr" / "notes.txt").write_text("mine")
    return []


def another_job(tmp_path: Path, config: Path) -> list[str]:
    make_store(config)
    return ["--set", "inputs.seed=7"]


def other_chunking(tmp_path: Path, config: Path) -> list[str]:
    make_store(config)
    return ["--set", "chunks.samples=25"]


def below_a_file(tmp_path: Path, config: Path) -> list[str]:
    (tmp_path / "file").write_text("")
    return ["--set", f"output.store={tmp_path / 'file' / 'out.zarr'}"]


def no_sbatch(tmp_path: Path, config: Path) -> list[str]:
    return ["--set", "cluster={kind: slurm}"]


CASES = {
    "foreign folder": (foreign_folder, r"output\.store: .* exists and is not a jacrun store"),
    "another job's store": (another_job, r"output\.store: .* holds another job .* pass --overwrite"),
    "other chunking on resume": (other_chunking, r"chunks\.samples: 25 does not match the existing store's"),
    "below a file": (below_a_file, r"output\.store: cannot create"),
    "no sbatch": (no_sbatch, r"cluster\.kind: slurm submits worker jobs with `sbatch`"),
}


@pytest.mark.parametrize("case", CASES)
def test_validate_refuses_what_submit_refuses(tmp_path, case, monkeypatch):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch here, whatever the machine has
    arrange, message = CASES[case]
    config = write_config(tmp_path, job_config())
    overrides = arrange(tmp_path, config)
    before = snapshot(tmp_path)
    validate = invoke("validate", str(config), *overrides)
    assert validate.exit_code == 2, validate.output
    assert snapshot(tmp_path) == before, "validate must not write"
    submit = invoke("submit", str(config), *overrides)
    assert submit.exit_code == 2, submit.output
    for result in (validate, submit):
        assert re.search(message, result.output), result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert validate.output == submit.output


def test_validate_accepts_a_resume_and_an_overwrite_without_touching_the_store(tmp_path):
    config = write_config(tmp_path, job_config())
    make_store(config)
    before = snapshot(tmp_path)
    for args in ([], ["--set", "chunks.samples=auto"], ["--set", "inputs.seed=7", "--overwrite"]):
        result = invoke("validate", str(config), *args)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("ok: ")
    assert snapshot(tmp_path) == before


def test_validate_exit_codes_through_the_real_command(tmp_path):
    config = write_config(tmp_path, job_config())
    assert run_cli("validate", str(config)).returncode == 0
    (tmp_path / "out.zarr").mkdir()
    (tmp_path / "out.zarr" / "notes.txt").write_text("mine")
    refused = run_cli("validate", str(config))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: ") and "not a jacrun store" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "out.zarr").iterdir()) == ["notes.txt"]
