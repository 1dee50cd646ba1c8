"""The jacrun command: Typer's CliRunner for the quick commands, real subprocesses for jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

import jacrun
from jacrun.cli import app
from jacrun.store import read_attrs
from tests.helpers import (
    HELD_BLOCKS,
    REPO,
    finish,
    held_job,
    hold,
    job_config,
    markers_done,
    one_error_line,
    run_cli,
    start_submit,
    wait_for_markers,
    write_config,
)

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_functions_lists_every_builtin_with_parameters():
    result = invoke("functions")
    assert result.exit_code == 0
    for kind in ("mlp", "linear", "lorenz96", "rosenbrock", "python"):
        assert kind in result.output
    assert "activation" in result.output and "sizes" in result.output


def test_validate_and_plan(tmp_path):
    path = write_config(tmp_path, job_config())
    result = invoke("validate", str(path))
    assert result.exit_code == 0 and "ok" in result.output
    result = invoke("plan", str(path), "--set", "chunks.samples=25")
    assert result.exit_code == 0, result.output
    assert "4 x 1 = 4 tasks" in result.output and "memory per block" in result.output
    # explicit chunks: a block's work is still timed for the estimate
    assert re.search(
        r"estimated runtime +│ [0-9.]+ s of blocks on 1 worker\(s\) \([0-9.]+ s per block", result.output
    )
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": {"kind": "random", "samples": 10, "sampels": 3}}, "inputs.sampels: unknown key"),
        (
            {"inputs": {"kind": "random", "samples": "many"}},
            "inputs.samples: Input should be a valid integer",
        ),
        ({"inputs": {"kind": "random", "samples": -5}}, "inputs.samples: Input should be greater than 0"),
        ({"function": {"kind": "mlp", "sizes": [4, -8, 2]}}, "function.sizes.1"),
        ({"inputs": {"kind": "npy", "path": "missing.npy"}}, "inputs.path: no such file"),
        (
            {"inputs": {"kind": "npy", "path": "x7.npy"}},
            "inputs.path: .* has shape \\(10, 7\\); the function needs",
        ),
        ({"vectors": {"kind": "npy", "path": "v9.npy"}}, "vectors.path: .* must match the 100 input samples"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "submit"])
def test_bad_configs_exit_2_with_one_message_and_no_store(tmp_path, change, message, command):
    np.save(tmp_path / "x7.npy", np.ones((10, 7)))
    np.save(tmp_path / "v9.npy", np.ones((9, 3)))
    raw = job_config(**change)
    path = write_config(tmp_path, raw)
    result = invoke(command, str(path))
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.zarr").exists()


def test_status_and_show(tmp_path, scheduler_address):
    path = write_config(tmp_path, job_config())
    cfg = jacrun.load_config(path)
    assert jacrun.submit(cfg, scheduler=scheduler_address, progress=False).ok
    result = invoke("status", str(cfg.output.store))
    assert result.exit_code == 0 and "complete, 4/4 blocks" in result.output
    result = invoke("show", str(cfg.output.store))
    assert result.exit_code == 0
    assert "vjp" in result.output and "(sample, vector, input)" in result.output
    assert re.search(r"time in blocks\W+\w+ \d+%", result.output)
    zarr.open_group(str(cfg.output.store), mode="r+")["_blocks"][0, 0] = 0
    result = invoke("status", str(cfg.output.store))
    assert result.exit_code == 1 and "3/4 blocks" in result.output
    result = invoke("status", str(tmp_path))
    assert result.exit_code == 2 and "not a jacrun store" in result.output


def test_quickstart_through_the_real_command(tmp_path):
    store = tmp_path / "quickstart.zarr"
    result = run_cli("submit", str(REPO / "configs" / "quickstart.yaml"), "--set", f"output.store={store}")
    assert result.returncode == 0, result.stderr + result.stdout
    assert re.search(
        r"Dashboard: (port 8787 is taken; serving on )?http://127\.0\.0\.1:\d+/status", result.stdout
    )
    assert "blocks" in result.stdout and "samples/s" in result.stdout
    assert "complete" in result.stdout
    assert re.search(r"time in blocks: (\w+ \d+%, )*kernel \d+%", result.stdout)
    ds = xr.open_zarr(store)
    assert ds.vjp.shape == (100_000, 4, 64) and ds.vjp.dtype == np.float32
    assert np.isfinite(ds.vjp[:100].values).all()
    rerun = run_cli("submit", str(REPO / "configs" / "quickstart.yaml"), "--set", f"output.store={store}")
    assert rerun.returncode == 0 and "already done" in rerun.stdout


def test_dashboard_serves_a_real_bokeh_page_while_a_job_runs(tmp_path):
    job = held_job(tmp_path)
    job["cluster"]["dashboard"] = "127.0.0.1:0"
    path = write_config(tmp_path, job)
    hold(tmp_path)
    proc = start_submit(path, merge_output=True)
    try:
        link = None
        deadline = time.monotonic() + 120
        while link is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            match = re.search(r"Dashboard: (http://127\.0\.0\.1:\d+/status)", line)
            link = match.group(1) if match else None
            assert line or proc.poll() is None, "submit ended before printing the dashboard link"
        assert link, "no dashboard link"
        with urllib.request.urlopen(link, timeout=30) as response:
            page = response.read().decode()
        assert response.status == 200 and "Bokeh" in page
        assert proc.poll() is None, "the job should still be running"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_submit_resumes_with_only_the_missing_blocks(tmp_path, scheduler_address):
    path = write_config(tmp_path, held_job(tmp_path))
    store = tmp_path / "held.zarr"
    released = hold(tmp_path)
    proc = start_submit(path, "--quiet")
    wait_for_markers(store, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = markers_done(store)
    assert 3 <= before < HELD_BLOCKS, f"kill the job mid-run (markers: {before})"

    released.unlink()
    result = run_cli("submit", str(path), "--scheduler", scheduler_address)
    assert result.returncode == 0, result.stdout + result.stderr
    attrs = jacrun.load(store).attrs["jacrun"]
    assert attrs["status"] == "complete" and attrs["blocks_done"] == HELD_BLOCKS
    assert attrs["runs"][-1]["blocks_computed"] == HELD_BLOCKS - before

    reference = jacrun.load_config(path, {"output.store": str(tmp_path / "ref.zarr")})
    assert jacrun.submit(reference, scheduler=scheduler_address, progress=False).ok
    resumed, clean = jacrun.load(store), jacrun.load(reference.output.store)
    np.testing.assert_array_equal(resumed.vjp.values, clean.vjp.values)
    np.testing.assert_array_equal(resumed.y.values, clean.y.values)


def test_ctrl_c_keeps_finished_blocks_and_says_how_to_resume(tmp_path):
    path = write_config(tmp_path, held_job(tmp_path))
    store = tmp_path / "held.zarr"
    hold(tmp_path)
    proc = start_submit(path, "--quiet")
    assert wait_for_markers(store, 3, proc) >= 3
    proc.send_signal(signal.SIGINT)
    _, stderr = finish(proc, 120)
    assert proc.returncode == 130, stderr
    assert "interrupted: finished blocks are kept; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    attrs = read_attrs(store)
    assert attrs["status"] == "interrupted" and attrs["runs"][-1]["status"] == "interrupted"
    # blocks already running may still finish after the client stopped: markers are the truth
    assert attrs["blocks_done"] <= markers_done(store) < HELD_BLOCKS


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_while_the_local_cluster_starts_is_one_line(tmp_path, monkeypatch, signum):
    """Ctrl-C or SIGTERM while the workers start (a worker preload that waits a second): the cluster
    finishes starting, is closed, and the run ends with its one line; Dask's own clean-up at
    exit has nothing left to close (it printed an AssertionError traceback)."""
    starting = tmp_path / "starting"
    preload = tmp_path / "slow_start.py"
    preload.write_text(f"import pathlib, time\npathlib.Path({str(starting)!r}).touch()\ntime.sleep(1)\n")
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", json.dumps([str(preload)]))
    path = write_config(tmp_path, job_config())
    proc = start_submit(path, "--quiet")
    deadline = time.monotonic() + 60
    while not starting.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert starting.exists(), "no worker started"
    proc.send_signal(signum)
    _, stderr = finish(proc, 60)
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), stderr
    assert stderr.strip() == f"{what}: finished blocks are kept; rerun the same command to resume"


def test_performance_report_and_overwrite_flags(tmp_path, scheduler_address):
    path = write_config(tmp_path, job_config())
    report = tmp_path / "report.html"
    on = ("--scheduler", scheduler_address)
    result = run_cli("submit", str(path), "--quiet", "--performance-report", str(report), *on)
    assert result.returncode == 0, result.stderr
    assert report.exists() and "Dask Performance Report" in report.read_text()
    other = run_cli("submit", str(path), "--quiet", "--set", "inputs.seed=7")
    assert other.returncode == 2 and "holds another job" in other.stderr
    again = run_cli("submit", str(path), "--quiet", "--set", "inputs.seed=7", "--overwrite", *on)
    assert again.returncode == 0, again.stderr
    assert read_attrs(tmp_path / "out.zarr")["config"]["inputs"]["seed"] == 7


# ---- command-line assignments: --set and -o share one parser ---------------------------------

SECRET_LOOKING = "[hunter2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", f"secret={SECRET_LOOKING}"], r"--storage-option secret: the value is not valid YAML"),
        (["-o", "a=1", "-o", "a.b=2"], r"--storage-option a\.b: a is not a section"),
        (["-o", "endpoint_url"], r"--storage-option endpoint_url: expected KEY=VALUE"),
        (["-o", "a..b=1"], r"--storage-option a\.\.b: a key path has no empty parts"),
    ],
)
def test_storage_option_mistakes_are_one_line_without_the_value(args, message):
    result = run_cli("status", "memory://nowhere/job.zarr", *args)
    assert re.search(message, one_error_line(result)), result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_set_mistakes_are_one_line_without_the_value(tmp_path):
    config = write_config(tmp_path, job_config(str(tmp_path / "out.zarr")))
    for args, message in [
        (["--set", f"output.store={SECRET_LOOKING}"], r"--set output\.store: the value is not valid YAML"),
        (
            ["--set", "chunks=1", "--set", "chunks.samples=2"],
            r"--set chunks\.samples: chunks is not a section",
        ),
    ]:
        result = run_cli("validate", str(config), *args)
        assert re.search(message, one_error_line(result)), result.stderr
        assert "hunter2" not in result.stderr + result.stdout
    assert not (tmp_path / "out.zarr").exists()
