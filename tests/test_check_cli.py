"""`jacrun check` and `submit --check`: the gradient checks from the command line and inside jobs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import jacrun
from jacrun.cli import app
from tests.helpers import REPO, job_config, run_cli, write_config

runner = CliRunner()
CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "examples").glob("*/job.yaml"))
FRAMEWORKS = {
    "torch_mlp": ("torch",),
    "jax_fn": ("jax",),
    "autograd_fn": ("autograd",),
    "stencils": ("jax", "asdex"),
}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.parent.name + "/" + p.name)
def test_check_passes_on_every_shipped_config(config):
    for package in FRAMEWORKS.get(config.parent.name, ()):
        pytest.importorskip(package)
    result = runner.invoke(app, ["check", str(config), "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output and "dot_product" in result.output


def wrong_vjp_job(tmp_path, **sections):
    function = {"kind": "python", "target": "tests.plugins:WrongVJP", "path": str(REPO), "params": {"n": 4}}
    return write_config(tmp_path, job_config(function=function, **sections))


def test_a_wrong_vjp_fails_check_naming_the_check_and_its_error(tmp_path):
    result = runner.invoke(app, ["check", str(wrong_vjp_job(tmp_path))])
    assert result.exit_code == 1
    assert "checks failed" in result.output
    assert "dot_product error" in result.output and "basis error" in result.output
    assert "9.9" in result.output  # |1.01 - 1| / 1.01: the size of the bug, not just its presence


def test_submit_check_records_the_checks(tmp_path, scheduler_address):
    cfg = jacrun.load_config(write_config(tmp_path, job_config(chunks={"samples": 25})))
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False, check=True)
    assert summary.ok
    checks = jacrun.load(cfg.output.store).attrs["jacrun"]["checks"]
    assert checks["passed"] is True and checks["blocks_checked"] == 4
    assert checks["worst"]["dot_product"] < 1e-12 and checks["tolerances"]["dot_product"] == 1e-10
    shown = runner.invoke(app, ["show", str(cfg.output.store)])
    assert shown.exit_code == 0 and "passed on 4 blocks" in shown.output


def test_submit_check_fails_the_job_on_a_wrong_vjp(tmp_path, scheduler_address):
    cfg = jacrun.load_config(wrong_vjp_job(tmp_path, retries=0, chunks={"samples": 50}))
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False, check=True)
    assert summary.status == "failed" and summary.blocks_done == 0
    assert "CheckFailed" in summary.failures[0] and "dot_product error" in summary.failures[0]
    with pytest.warns(UserWarning):
        checks = jacrun.load(cfg.output.store).attrs["jacrun"]["checks"]
    assert checks["passed"] is False and len(checks["failures"]) == 2


def test_submit_check_flag_through_the_real_command(tmp_path):
    path = wrong_vjp_job(
        tmp_path,
        retries=0,
        chunks={"samples": 50},
        cluster={"kind": "local", "workers": 1, "dashboard": None},
    )
    result = run_cli("submit", str(path), "--check", "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CheckFailed" in result.stderr and "dot_product error" in result.stderr
    result = run_cli("submit", str(write_config(tmp_path / "good", job_config())), "--check", "--quiet")
    assert result.returncode == 0, result.stderr
    with pytest.warns(UserWarning):  # the first job is incomplete
        jacrun.load(tmp_path / "out.zarr")
    assert jacrun.load(tmp_path / "good" / "out.zarr").attrs["jacrun"]["checks"]["passed"] is True
