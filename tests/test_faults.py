"""Faults with real processes: `dask scheduler` / `dask worker` on 127.0.0.1, real stores.

Each test checks that nothing finished is lost and that rerunning the same command finishes
the job with the same numbers as an undisturbed run.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import jacrun
from jacrun.block import BlockJob, run_block
from jacrun.config import config_from_dict
from jacrun.prepare import prepare
from jacrun.runner import open_output
from tests.helpers import (
    HELD_BLOCKS,
    REPO,
    DaskProcesses,
    finish,
    held_job,
    hold,
    holding_process,
    job_config,
    markers_done,
    run_cli,
    start_submit,
    wait_for_markers,
    write_config,
)


@pytest.fixture
def dask_processes(tmp_path):
    processes = DaskProcesses(tmp_path)
    yield processes
    processes.stop()


def held(folder: Path) -> Path:
    """:func:`held_job` for --scheduler (no cluster section), its config written in ``folder``."""
    job = held_job(folder)
    job.pop("cluster")
    return write_config(folder, job)


@pytest.fixture
def reference(tmp_path_factory, scheduler_address):
    """The held job run undisturbed (on the shared LocalCluster)."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = jacrun.load_config(held(folder))
    assert jacrun.submit(cfg, scheduler=scheduler_address, progress=False).ok
    return jacrun.load(cfg.output.store)


def assert_same_results(store: Path, reference) -> None:
    ds = jacrun.load(store)
    np.testing.assert_array_equal(ds.vjp.values, reference.vjp.values)
    np.testing.assert_array_equal(ds.y.values, reference.y.values)


def test_worker_killed_mid_job(tmp_path, dask_processes, reference):
    address = dask_processes.start_scheduler()
    dask_processes.start_workers(2)
    config = held(tmp_path)
    released = hold(tmp_path)
    proc = start_submit(config, "--scheduler", address, "--quiet")
    os.kill(holding_process(tmp_path), signal.SIGKILL)  # the worker running the held block
    released.unlink()
    _, stderr = finish(proc, 240)
    assert proc.returncode == 0, stderr
    assert_same_results(tmp_path / "held.zarr", reference)


def test_scheduler_killed_mid_job_then_resumed_on_a_new_one(tmp_path, dask_processes, reference):
    address = dask_processes.start_scheduler()
    dask_processes.start_workers(2)
    config = held(tmp_path)
    released = hold(tmp_path)
    proc = start_submit(config, "--scheduler", address, "--quiet")
    assert wait_for_markers(tmp_path / "held.zarr", 3, proc) >= 3
    dask_processes.kill(dask_processes.scheduler)
    _, stderr = finish(proc, 240)
    assert proc.returncode == 1
    assert "lost the connection to the scheduler" in stderr and "rerun the same command" in stderr
    assert "Traceback" not in stderr
    dask_processes.stop()
    before = markers_done(tmp_path / "held.zarr")
    assert before < HELD_BLOCKS

    released.unlink()
    address = dask_processes.start_scheduler()
    dask_processes.start_workers(2)
    result = run_cli("submit", str(config), "--scheduler", address, "--quiet")
    assert result.returncode == 0, result.stderr
    assert_same_results(tmp_path / "held.zarr", reference)
    runs = jacrun.load(tmp_path / "held.zarr").attrs["jacrun"]["runs"]
    assert runs[0]["status"] == "failed" and runs[0]["blocks_lost"] > 0
    # workers may finish running blocks after the client lost them: markers are the truth
    assert runs[0]["blocks_computed"] <= before and runs[1]["blocks_computed"] == HELD_BLOCKS - before


def tripwire_job(tmp_path: Path, action: str, **sections) -> dict:
    """Tripwire (y = sin x) on 100 rows in blocks of 20; block 2 (rows 40:60) trips."""
    x = np.random.default_rng(0).normal(size=(100, 3))
    x[45, 0] = 999.0
    np.save(tmp_path / "x.npy", x)
    flags = tmp_path / "flags"
    flags.mkdir(exist_ok=True)
    function = {
        "kind": "python",
        "target": "tests.plugins:Tripwire",
        "path": str(REPO),
        "params": {"n": 3, "action": action, "flag_dir": str(flags)},
    }
    return job_config(
        function=function,
        inputs={"kind": "npy", "path": "x.npy"},
        vectors={"kind": "random", "count": 2},
        chunks={"samples": 20},
        **sections,
    )


def test_a_block_that_raises_once_is_retried(tmp_path, scheduler_address):
    cfg = config_from_dict(tripwire_job(tmp_path, "raise-once"), tmp_path)
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert summary.ok and summary.blocks_done == 5
    assert len(list((tmp_path / "flags").glob("tripped-*"))) == 1  # it did fail once


def test_a_block_that_always_fails_fails_the_job_and_keeps_the_rest(tmp_path):
    config = write_config(tmp_path, tripwire_job(tmp_path, "raise", retries=1))
    result = run_cli("submit", str(config))
    assert result.returncode == 1
    assert "block (2, 0) samples 40:60" in result.stderr and "tripwire at 999.0" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    marks = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["_blocks"][...]
    assert marks[:, 0].tolist() == [1, 1, 0, 1, 1]
    attrs = jacrun.load(tmp_path / "out.zarr").attrs["jacrun"]
    assert attrs["status"] == "failed" and "block (2, 0)" in attrs["runs"][-1]["failures"][0]


def test_a_block_that_kills_its_worker_fails_the_job_and_the_store_resumes(tmp_path):
    (tmp_path / "flags").mkdir()
    (tmp_path / "flags" / "armed").write_text("1")
    raw = tripwire_job(tmp_path, "kill", cluster={"kind": "local", "workers": 2, "dashboard": None})
    config = write_config(tmp_path, raw)
    env = {  # one task per worker at a time: no innocent bystander dies with the bad block
        **os.environ,
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "jacrun", "submit", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "block (2, 0) samples 40:60" in result.stderr and "KilledWorker" in result.stderr
    marks = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["_blocks"][...]
    assert marks[:, 0].tolist() == [1, 1, 0, 1, 1]

    (tmp_path / "flags" / "armed").unlink()
    result = run_cli("submit", str(config))
    assert result.returncode == 0, result.stderr
    runs = jacrun.load(tmp_path / "out.zarr").attrs["jacrun"]["runs"]
    assert [r["blocks_computed"] for r in runs] == [4, 1]


def _run_once(args: tuple) -> None:
    job, i, j = args
    run_block(job, i, j)


def test_the_same_block_run_twice_concurrently_writes_identical_bytes(tmp_path):
    stores = {}
    for name, copies in (("once", 1), ("twice", 2)):
        cfg = config_from_dict(
            job_config(
                store=f"{name}.zarr",
                function={"kind": "mlp", "sizes": [8, 64, 64, 4], "seed": 0},
                inputs={"kind": "random", "samples": 4000},
                chunks={"samples": 2000},
            ),
            tmp_path,
        )
        job = open_output(prepare(cfg))
        block = BlockJob(cfg, job.config_hash, job.plan, job.inputs, job.vectors, str(cfg.output.store))
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            list(pool.map(_run_once, [(block, 1, 0)] * copies))
        stores[name] = Path(cfg.output.store)
    files = sorted(p.relative_to(stores["once"]) for p in stores["once"].rglob("*") if p.is_file())
    chunk_files = [f for f in files if f.name != "zarr.json"]
    assert len(chunk_files) >= 3  # the vjp chunk, the y chunk and the marker
    for relative in chunk_files:
        assert (stores["once"] / relative).read_bytes() == (stores["twice"] / relative).read_bytes()


def test_local_cluster_listens_on_loopback_only():
    import psutil

    from jacrun.cluster import connect
    from jacrun.config import LocalClusterConfig

    def listening() -> set[tuple[str, int]]:
        me = psutil.Process()
        sockets = set()
        for process in [me, *me.children(recursive=True)]:
            try:
                connections = process.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            sockets |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
        return sockets

    before = listening()
    config = LocalClusterConfig(workers=2, dashboard="127.0.0.1:0")
    with connect(config) as client:
        client.wait_for_workers(2)
        opened = listening() - before
        assert client.dashboard_link.startswith("http://127.0.0.1:")
    assert len(opened) >= 4  # scheduler, dashboard, two workers (and their nannies)
    assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened


def test_two_jobs_on_one_scheduler_never_share_task_keys(tmp_path, scheduler_address):
    """Same name, same shapes, other seeds, submitted at once: keys carry the config hash."""
    configs = [
        config_from_dict(
            job_config(store=f"job{seed}.zarr", inputs={"kind": "random", "samples": 400, "seed": seed}),
            tmp_path,
        )
        for seed in (1, 2)
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        summaries = list(
            pool.map(lambda cfg: jacrun.submit(cfg, scheduler=scheduler_address, progress=False), configs)
        )
    assert all(s.ok for s in summaries)
    one, two = (jacrun.load(cfg.output.store) for cfg in configs)
    assert not np.allclose(one.y.values, two.y.values)
    for cfg, ds in zip(configs, (one, two), strict=True):
        alone = config_from_dict(
            job_config(store=f"alone-{cfg.inputs.seed}.zarr", inputs=cfg.inputs.model_dump()), tmp_path
        )
        assert jacrun.submit(alone, scheduler=scheduler_address, progress=False).ok
        np.testing.assert_array_equal(ds.vjp.values, jacrun.load(alone.output.store).vjp.values)
