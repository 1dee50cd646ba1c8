"""One run per store: a second live run is refused naming the holder; a dead or stale one is taken over."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from rich.console import Console

import jacrun
from jacrun import lease, location
from jacrun.errors import ConfigError
from tests.helpers import (
    HELD_BLOCKS,
    held_job,
    hold,
    job_config,
    markers_done,
    run_cli,
    start_submit,
    wait_for_markers,
    write_config,
)


def read_lease(store) -> dict | None:
    data = location.get_bytes(location.zarr_store(store), lease.KEY)
    return None if data is None else json.loads(data)


def test_a_second_run_is_refused_while_the_first_lives_and_takes_over_once_it_is_killed(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("JACRUN_LEASE_STALE_SECONDS", "2")  # heartbeat every 0.4 s
    config = write_config(tmp_path, held_job(tmp_path))
    store = tmp_path / "held.zarr"
    released = hold(tmp_path)
    first = start_submit(config)
    try:
        assert wait_for_markers(store, HELD_BLOCKS - 1, first) == HELD_BLOCKS - 1
        beat = read_lease(store)
        assert beat["pid"] == first.pid
        time.sleep(0.6)
        assert read_lease(store)["heartbeat"] > beat["heartbeat"]  # the run keeps it fresh

        second = run_cli("submit", str(config))
        assert second.returncode == 2, second.stderr
        message = second.stderr.strip()
        assert "in use by another jacrun run" in message and f"pid {first.pid} on host" in message
        assert len(message.splitlines()) == 1 and "Traceback" not in message
        assert "blocks to run" not in second.stdout  # refused before any cluster started
        assert first.poll() is None
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done = markers_done(store)
    released.unlink()
    third = run_cli("submit", str(config))
    assert third.returncode == 0, third.stderr
    assert "took over the lease of a run that is gone" in third.stdout
    assert f"{HELD_BLOCKS - done} of {HELD_BLOCKS} blocks to run" in third.stdout
    assert read_lease(store) is None  # released at the end


def foreign_lease(store, age: float) -> None:
    holder = {
        "host": "elsewhere",
        "pid": 4242,
        "started": "then",
        "heartbeat": time.time() - age,
        "token": "x",
    }
    location.set_bytes(location.zarr_store(store), lease.KEY, json.dumps(holder).encode())


def test_a_live_lease_of_another_host_refuses_and_a_stale_one_is_taken_over(
    tmp_path, scheduler_address, monkeypatch
):
    cfg = jacrun.load_config(write_config(tmp_path, job_config()))
    store = cfg.output.store
    foreign_lease(store, age=5)
    with pytest.raises(ConfigError, match=r"output\.store: .* in use .*pid 4242 on host elsewhere"):
        jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert not (store / "zarr.json").exists()  # nothing written
    assert read_lease(store)["pid"] == 4242

    monkeypatch.setenv("JACRUN_LEASE_STALE_SECONDS", "3")
    console = Console(record=True, width=300)
    assert jacrun.submit(cfg, scheduler=scheduler_address, console=console).ok
    assert "warning: took over a stale lease (pid 4242 on host elsewhere" in console.export_text()
    assert read_lease(store) is None


def test_a_refused_run_into_a_new_store_leaves_no_folder(tmp_path, scheduler_address):
    cfg = jacrun.load_config(write_config(tmp_path, job_config(), name="job.yaml"))
    held = lease.Lease(cfg.output.store)
    held.acquire()
    try:
        with pytest.raises(ConfigError, match="in use by another jacrun run"):
            jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    finally:
        held.release()
    assert not cfg.output.store.exists()
