"""``cluster: {kind: slurm}`` through the real ``jacrun`` command on a real SLURM (tests/slurm.py).

Every scenario runs in its own folder (SLURM's working directory for its batch jobs) and ends
with no batch job of that folder left in the queue. The blocks run ``tests.plugins:Sleepy``
(sin(x), with a pause per block), so a job's length is set by its block count, and every
computation of a block is logged; the results are compared with a local run of the same job.

The job longer than a walltime takes about two minutes (SLURM's walltimes are whole minutes):
it starts with this module and runs beside the other scenarios, and its test, the last one,
waits for it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jacrun.cli import app
from jacrun.store import read_attrs
from tests.helpers import (
    REPO,
    as_from_a_terminal,
    job_config,
    markers_done,
    one_error_line,
    run_cli,
    write_config,
)
from tests.slurm import MAX_MINUTES, Slurm

LONG_TEST = "test_a_job_longer_than_its_walltime_completes_in_one_submit"
LONG_SAMPLES = 16_000
"""160 blocks of 1 s: about 80 s of work for two workers that retire every 34-40 s."""
ROWS = 100
"""Samples per block."""


def slurm_job(folder: Path, samples: int, delay: float, **cluster) -> Path:
    """A job of ``samples // ROWS`` blocks of ``delay`` seconds on two 1-core batch jobs."""
    (folder / "log").mkdir(parents=True, exist_ok=True)
    config = job_config(
        store="out.zarr",
        function={
            "kind": "python",
            "target": "tests.plugins:Sleepy",
            "path": str(REPO),
            "params": {"n": 3, "delay": delay, "log_dir": str(folder / "log")},
        },
        inputs={"kind": "random", "samples": samples, "seed": 1},
        vectors={"kind": "random", "count": 2, "seed": 2},
        chunks={"samples": ROWS},
        cluster={
            "kind": "slurm",
            "account": "jacrun",
            "cores": 1,
            "processes": 1,
            "memory": "1GiB",
            "walltime": "00:05:00",
            "jobs": 2,
            "dashboard": "127.0.0.1:0",
            "startup_timeout": "2m",
            **cluster,
        },
    )
    return write_config(folder, config)


def start(config: Path) -> subprocess.Popen:
    """``jacrun submit`` in the config's folder, its output into ``output.txt`` there."""
    folder = config.parent
    with open(folder / "output.txt", "w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "jacrun", "submit", str(config)],
            cwd=folder,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1"},
            preexec_fn=as_from_a_terminal,
        )


def wait_for_blocks(store: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while markers_done(store) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return markers_done(store)


def results(store: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][...] for name in ("vjp", "y")}


def assert_identical(store: Path, reference: dict[str, np.ndarray]) -> None:
    """Bit for bit what the local run stored, for this job's samples."""
    for name, values in results(store).items():
        np.testing.assert_array_equal(values, reference[name][: len(values)], err_msg=name)


@dataclass(frozen=True, order=True)
class Computation:
    """One computation of a block, from the log that ``Sleepy`` writes."""

    began: float
    ended: float
    block: float
    """The block's first input."""
    pid: int
    """The worker process."""


def computations(folder: Path) -> list[Computation]:
    found = []
    for record in (folder / "log").iterdir():
        first, pid, began, ended = record.read_text().split()
        block = float(first.removeprefix("np.float64(").rstrip(")"))
        found.append(Computation(float(began), float(ended), block, int(pid)))
    return sorted(found)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """The same job on a local cluster, without pauses and in larger blocks (the results do not
    depend on the chunking: y = sin(x) and v cos(x) are elementwise): what every SLURM run of its
    first samples must store."""
    folder = tmp_path_factory.mktemp("local")
    config = slurm_job(folder, LONG_SAMPLES, 0.0)
    local = {"kind": "local", "workers": 1, "memory_limit": "1GiB", "dashboard": None}
    settings = ["--set", f"cluster={json.dumps(local)}", "--set", "chunks.samples=2000"]
    done = run_cli("submit", str(config), "--quiet", *settings, cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    return results(folder / "out.zarr")


@dataclass
class LongRun:
    folder: Path
    proc: subprocess.Popen


@pytest.fixture(scope="module", autouse=True)
def long_run(request, slurm_cluster: Slurm, tmp_path_factory):
    """The job longer than its walltime, started with the module when its test is selected."""
    if not any(item.name == LONG_TEST for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("long")
    proc = start(slurm_job(folder, LONG_SAMPLES, 1.0, walltime="00:01:00"))
    yield LongRun(folder, proc)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


def test_a_slurm_job_stores_what_a_local_run_stores(slurm_cluster, reference, tmp_path):
    config = slurm_job(tmp_path, 2000, 0.1)
    done = run_cli("submit", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "complete: 20/20 blocks" in done.stdout
    assert "batch jobs: 2 running" in done.stdout, done.stdout
    # the dashboard listens on loopback, and submit says how to reach it from another machine
    link = re.search(
        r"Dashboard: http://127\.0\.0\.1:(\d+)/status \(from another machine: ssh -L (\d+):127\.0\.0\.1:(\d+) \S+\)",
        done.stdout,
    )
    assert link and len(set(link.groups())) == 1, done.stdout
    assert_identical(tmp_path / "out.zarr", reference)
    assert len(list(tmp_path.glob("slurm-*.out"))) == 2  # `jobs` batch jobs ran
    assert slurm_cluster.wait_empty(tmp_path) == []


@pytest.mark.parametrize(
    ("setting", "key", "reason"),
    [
        ("cluster.memory=100GiB", "cluster.memory", "Requested node configuration is not available"),
        ("cluster.cores=64", "cluster.cores", "More processors requested than permitted"),
        ("cluster.queue=nosuch", "cluster.queue", "Invalid partition name specified"),
        ("cluster.account=nosuch", "cluster.account", "Invalid account or account/partition combination"),
        ("cluster.walltime=02:00:00", "cluster.walltime", "Requested time limit is invalid"),
    ],
)
def test_a_request_slurm_refuses_is_one_line_before_anything_is_written(
    slurm_cluster,
    tmp_path,
    setting,
    key,
    reason,
):
    config = slurm_job(tmp_path, 2000, 0.0)
    line = one_error_line(run_cli("submit", str(config), "--set", setting, cwd=tmp_path))
    assert f"{key}: SLURM refuses" in line and reason in line and line.count('"') == 2, line
    validated = CliRunner().invoke(app, ["validate", str(config), "--set", setting])  # the same, in-process
    assert validated.exit_code == 2 and validated.output.strip() == line, validated.output
    assert not (tmp_path / "out.zarr").exists()
    assert slurm_cluster.queue(tmp_path) == []


def test_a_walltime_over_the_partitions_limit_is_refused_even_where_slurm_would_queue_it(
    slurm_cluster,
    tmp_path,
):
    """sinfo's limits: a site that does not enforce them at submission leaves the job pending."""
    from jacrun.config import JobqueueClusterConfig
    from jacrun.errors import ConfigError
    from jacrun.slurm import check_request

    cluster = JobqueueClusterConfig(kind="slurm", walltime=f"{MAX_MINUTES + 1}:00:00")
    with pytest.raises(
        ConfigError, match=r"cluster\.walltime: 11:00:00 exceeds partition debug's time limit 10:00"
    ):
        check_request(cluster, "#!/bin/bash\n#SBATCH -t 1\ntrue\n")  # the script itself passes


def test_a_cancelled_batch_job_is_replaced_and_the_job_completes(slurm_cluster, reference, tmp_path):
    proc = start(slurm_job(tmp_path, 3000, 0.3))
    try:
        assert wait_for_blocks(tmp_path / "out.zarr", 6, proc) >= 6
        victim = slurm_cluster.running(tmp_path)[0]
        slurm_cluster.command("scancel", victim)
        assert proc.wait(120) == 0, (tmp_path / "output.txt").read_text()
    finally:
        proc.kill()
    output = (tmp_path / "output.txt").read_text()
    assert re.search(rf"replacing workers: [^;]*\b{victim} CANCELLED", output), output
    assert_identical(tmp_path / "out.zarr", reference)
    assert slurm_cluster.wait_empty(tmp_path) == []


@pytest.mark.parametrize(
    ("signum", "code", "line"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
    ids=["sigterm", "ctrl-c"],
)
def test_sigterm_or_ctrl_c_cancels_every_batch_job_and_a_rerun_completes_the_rest(
    slurm_cluster,
    reference,
    tmp_path,
    signum,
    code,
    line,
):
    """Ctrl-C too: dask_jobqueue, on import, makes SIGINT call sys.exit() (exit 0, the run
    not recorded); jacrun puts Python's handling back."""
    config = slurm_job(tmp_path, 2000, 0.3)
    proc = start(config)
    try:
        assert wait_for_blocks(tmp_path / "out.zarr", 4, proc) >= 4
        proc.send_signal(signum)
        assert proc.wait(60) == code, (tmp_path / "output.txt").read_text()
    finally:
        proc.kill()
    output = (tmp_path / "output.txt").read_text()
    assert f"{line}: finished blocks are kept; rerun the same command to resume" in output, output
    assert "Traceback" not in output, output
    assert read_attrs(tmp_path / "out.zarr")["status"] == "interrupted"
    assert slurm_cluster.wait_empty(tmp_path) == []
    if signum == signal.SIGINT:
        return  # the rerun is the same after either signal
    done_before = markers_done(tmp_path / "out.zarr")
    assert 4 <= done_before < 20
    again = run_cli("submit", str(config), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"complete: 20/20 blocks ({20 - done_before} this run)" in again.stdout
    assert_identical(tmp_path / "out.zarr", reference)
    assert slurm_cluster.wait_empty(tmp_path) == []


def test_workers_that_never_arrive_end_the_run_in_one_line(slurm_cluster, tmp_path):
    """Batch jobs held in the queue: the terminal says why they wait, and startup_timeout ends it."""
    config = slurm_job(tmp_path, 2000, 0.0, job_extra_directives=["--begin=now+1hour"], startup_timeout="4s")
    done = run_cli("submit", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "batch jobs: 2 pending (BeginTime)" in done.stdout
    [line] = done.stderr.splitlines()
    assert "cluster.startup_timeout: no worker joined within 4 s (2 pending (BeginTime))" in line
    assert slurm_cluster.wait_empty(tmp_path) == []


def test_batch_jobs_whose_workers_fail_to_start_end_the_run(slurm_cluster, tmp_path):
    config = slurm_job(tmp_path, 2000, 0.0, job_script_prologue=["exit 3"])
    done = run_cli("submit", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert re.search(
        r"cluster: \d+ batch jobs in a row ended before any of their workers joined .*: FAILED", line
    ), line
    assert slurm_cluster.wait_empty(tmp_path) == []


def test_a_job_longer_than_its_walltime_completes_in_one_submit(slurm_cluster, reference, long_run):
    """Walltime one minute, about two minutes of blocks: workers retire before the walltime and
    their batch jobs are replaced, three generations of them, in one `jacrun submit`."""
    folder, proc = long_run.folder, long_run.proc
    assert proc.wait(240) == 0, (folder / "output.txt").read_text()
    output = (folder / "output.txt").read_text()
    seconds = float(re.search(r"complete: 160/160 blocks \(160 this run\) in ([\d.]+) s", output).group(1))
    assert seconds > 60, output  # longer than one walltime
    batch_jobs = len(list(folder.glob("slurm-*.out")))
    assert batch_jobs >= 6, output  # 2 jobs, replaced twice each: three generations
    assert "replacing workers" in output
    assert_identical(folder / "out.zarr", reference)
    # no block computed twice, except one in flight when its worker retired: computed first by
    # a worker process that then left, as one of its last two (the one it was running, and one
    # the scheduler had already handed it), and then once more
    done = computations(folder)
    times = Counter(c.block for c in done)
    assert len(times) == 160 and set(times.values()) <= {1, 2}, times
    by_worker = defaultdict(list)
    for computation in done:
        by_worker[computation.pid].append(computation)
    last_two = {c for runs in by_worker.values() for c in runs[-2:]}
    repeated = [min(c for c in done if c.block == block) for block, n in times.items() if n == 2]
    assert set(repeated) <= last_two and len(repeated) <= 2 * (batch_jobs - 2), repeated
    assert slurm_cluster.wait_empty() == []
