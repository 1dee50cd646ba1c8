"""Stores on S3: real jobs on real clusters into moto's S3 server on 127.0.0.1 (no network).

The same job gives bit-identical results in a local store and in the bucket; faults (a worker
killed, a client killed) lose nothing there either; bad input is one line, exit 2, before
any cluster starts; the credentials never show.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from rich.console import Console
from typer.testing import CliRunner

import jacrun
from jacrun import lease, location, store
from jacrun.cli import app
from jacrun.errors import ConfigError
from tests.helpers import (
    HELD_BLOCKS,
    DaskProcesses,
    finish,
    held_job,
    hold,
    holding_process,
    job_config,
    run_cli,
    start_submit,
    write_config,
)

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

SECRET = "s3cr3t-never-printed"
BUCKET = "jobs"
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with bucket ``jobs``; dummy credentials in the environment
    (inherited by the jacrun and dask processes the tests start)."""
    env = pytest.MonkeyPatch()
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server._port}"
    s3fs.S3FileSystem(endpoint_url=url).mkdir(BUCKET)
    yield url
    server.stop()
    env.undo()


def options(endpoint: str, secret: bool = False) -> dict:
    """storage_options for the moto server; ``secret``: credentials in the options (not the env)."""
    extra = {"key": "testing", "secret": SECRET} if secret else {}
    return {"endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}, **extra}


def fs(endpoint: str):
    return s3fs.S3FileSystem(endpoint_url=endpoint)


def s3_job(url: str, endpoint: str, secret: bool = True, **sections) -> dict:
    config = job_config(store=url, **sections)
    config["output"] = {**config["output"], "storage_options": options(endpoint, secret)}
    return config


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_a_job_into_s3_is_bit_identical_to_local_and_reads_back_everywhere(
    tmp_path, endpoint, scheduler_address
):
    x = np.random.default_rng(5).standard_normal((90, 5))
    zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=x.shape, dtype=x.dtype)[...] = x
    remote_x = zarr.open_array(
        zarr.storage.FsspecStore.from_url(f"s3://{BUCKET}/inputs/x.zarr", storage_options=options(endpoint)),
        mode="w",
        shape=x.shape,
        dtype=x.dtype,
    )
    remote_x[...] = x
    sections = {"vectors": {"kind": "random", "count": 4}, "chunks": {"samples": 30, "vectors": 2}}
    local = job_config(inputs={"kind": "zarr", "path": str(tmp_path / "x.zarr")}, **sections)
    url = f"s3://{BUCKET}/same.zarr"
    inputs = {
        "kind": "zarr",
        "path": f"s3://{BUCKET}/inputs/x.zarr",
        "storage_options": options(endpoint, True),
    }
    remote = s3_job(url, endpoint, secret=True, inputs=inputs, **sections)
    console = Console(record=True, width=200)
    for config in (local, remote):
        cfg = jacrun.config_from_dict(config, tmp_path)
        summary = jacrun.submit(cfg, scheduler=scheduler_address, console=console)
        assert summary.ok and summary.blocks_run == 6, summary.failures
    assert jacrun.submit(cfg, scheduler=scheduler_address, console=console).blocks_run == 0  # resumes: done

    here = jacrun.load(tmp_path / "out.zarr")
    there = jacrun.load(url, storage_options=options(endpoint, True))
    plain = xr.open_zarr(url, storage_options=options(endpoint, True))
    for ds in (there, plain):
        np.testing.assert_array_equal(ds.vjp.values, here.vjp.values)
        np.testing.assert_array_equal(ds.y.values, here.y.values)
    assert "storage_options" not in json.dumps(there.attrs["jacrun"]["config"])
    assert not fs(endpoint).exists(f"{BUCKET}/same.zarr/{lease.KEY}")  # released

    outputs = [console.export_text()]
    for command in ("status", "show", "verify"):
        result = invoke(
            command, url, "-o", f"endpoint_url={endpoint}", "-o", f"secret={SECRET}", "-o", "key=testing"
        )
        assert result.exit_code == 0, (command, result.output)
        outputs.append(result.output)
    picture = tmp_path / "remote.png"
    options_given = [
        f"--storage-option={o}" for o in (f"endpoint_url={endpoint}", f"secret={SECRET}", "key=testing")
    ]
    plotted = run_cli("plot", url, "--output", str(picture), *options_given)  # a fresh process
    assert plotted.returncode == 0 and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plotted.stderr
    outputs.append(plotted.stdout + plotted.stderr)
    s3 = fs(endpoint)  # a lost marker, then a flipped byte: found, repaired, recomputed bit-identical
    s3.rm(f"{BUCKET}/same.zarr/_blocks/c/1/1")
    assert jacrun.submit(cfg, scheduler=scheduler_address, progress=False).blocks_run == 1
    chunk = f"{BUCKET}/same.zarr/vjp/c/2/0/0"
    data = bytearray(s3.cat(chunk))
    data[5] ^= 1
    s3.pipe(chunk, bytes(data))
    credentials = ("-o", "key=testing", "-o", f"secret={SECRET}")
    result = invoke("verify", url, "--repair", "-o", f"endpoint_url={endpoint}", *credentials)
    assert result.exit_code == 1, result.output
    assert re.findall(r"damaged block \((\d+), (\d+)\)", result.output) == [("2", "0")]
    assert jacrun.submit(cfg, scheduler=scheduler_address, progress=False).blocks_run == 1
    np.testing.assert_array_equal(jacrun.load(url).vjp.values, here.vjp.values)
    outputs.append(result.output)
    stored = b"".join(
        fs(endpoint).cat(path) for path in fs(endpoint).find(f"{BUCKET}/same.zarr") if "zarr.json" in path
    )
    assert SECRET not in "".join(outputs) and SECRET.encode() not in stored


def test_overwrite_on_s3_replaces_a_jacrun_store_and_never_a_foreign_prefix(
    tmp_path, endpoint, scheduler_address
):
    fs(endpoint).pipe(f"{BUCKET}/foreign.zarr/notes.txt", b"mine")
    foreign = jacrun.config_from_dict(s3_job(f"s3://{BUCKET}/foreign.zarr", endpoint), tmp_path)
    with pytest.raises(ConfigError, match="exists and is not a jacrun store"):
        jacrun.submit(foreign, scheduler=scheduler_address, overwrite=True, progress=False)
    assert fs(endpoint).find(f"{BUCKET}/foreign.zarr") == [f"{BUCKET}/foreign.zarr/notes.txt"]

    url = f"s3://{BUCKET}/replaced.zarr"
    first = jacrun.config_from_dict(s3_job(url, endpoint), tmp_path)
    assert jacrun.submit(first, scheduler=scheduler_address, progress=False).ok
    other = s3_job(url, endpoint, function={"kind": "linear", "n_in": 5, "n_out": 3, "seed": 9})
    second = jacrun.config_from_dict(other, tmp_path)
    with pytest.raises(ConfigError, match="holds another job"):
        jacrun.submit(second, scheduler=scheduler_address, progress=False)
    assert jacrun.submit(second, scheduler=scheduler_address, overwrite=True, progress=False).ok
    store.location.register(url, options(endpoint))
    assert store.read_attrs(url)["config_hash"] == second.content_hash()


def test_a_live_lease_on_s3_refuses_a_second_run(tmp_path, endpoint, scheduler_address):
    url = f"s3://{BUCKET}/leased.zarr"
    cfg = jacrun.config_from_dict(s3_job(url, endpoint), tmp_path)
    location.register(url, options(endpoint))
    held = lease.Lease(url)
    held.acquire()
    try:
        with pytest.raises(ConfigError, match=r"in use by another jacrun run \(pid \d+ on host"):
            jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    finally:
        held.release()
    assert fs(endpoint).find(f"{BUCKET}/leased.zarr") == []


@pytest.mark.parametrize(
    ("store_url", "storage", "message"),
    [
        ("s3://no-such-bucket/job.zarr", "moto", r"bucket 'no-such-bucket' does not exist"),
        ("s3://jobs/job.zarr", "http://127.0.0.1:{closed}", r"cannot reach the storage endpoint"),
        ("gs://bucket/job.zarr", None, r"gs:// needs an fsspec implementation: install gcsfs"),
        (
            "s3://jobs/job.zarr",
            "not-a-mapping",
            r"output\.storage_options: must be a mapping of fsspec options .*, not a list",
        ),
    ],
)
def test_bad_remote_input_is_one_line_exit_2_before_any_cluster(
    tmp_path, endpoint, store_url, storage, message
):
    config = job_config(store=store_url, cluster={"kind": "address", "address": "tcp://127.0.0.1:1"})
    if storage == "moto":
        config["output"]["storage_options"] = options(endpoint, secret=True)
    elif storage == "not-a-mapping":
        config["output"]["storage_options"] = ["endpoint_url", endpoint]
    elif storage is not None:
        config["output"]["storage_options"] = {
            **options(endpoint, True),
            "endpoint_url": storage.format(closed=free_port()),
        }
        config["output"]["storage_options"]["config_kwargs"] = {"retries": {"max_attempts": 1}}
    path = write_config(tmp_path, config)
    result = invoke("submit", str(path))
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert re.search(message, result.output), result.output
    assert SECRET not in result.output
    if store_url.startswith("s3://jobs/"):
        assert fs(endpoint).find(f"{BUCKET}/job.zarr") == []


def test_validate_plan_and_check_of_a_remote_job_touch_no_store_and_print_no_secret(tmp_path, endpoint):
    url = f"s3://{BUCKET}/untouched.zarr"
    path = write_config(tmp_path, s3_job(url, endpoint))
    for command in ("validate", "plan", "check"):
        result = invoke(command, str(path))
        assert result.exit_code == 0, (command, result.output)
        assert SECRET not in result.output
    assert url in invoke("plan", str(path)).output
    assert fs(endpoint).find(f"{BUCKET}/untouched.zarr") == []


# ---- faults ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, scheduler_address):
    """The held job (see tests.helpers.held_job) run undisturbed into a local store."""
    folder = tmp_path_factory.mktemp("s3reference")
    cfg = jacrun.config_from_dict(held_job(folder), folder)
    assert jacrun.submit(cfg, scheduler=scheduler_address, progress=False).ok
    return jacrun.load(cfg.output.store)


def remote_fault_job(tmp_path: Path, endpoint: str, name: str, **sections) -> tuple[Path, str]:
    """The held job into the bucket, its last block held (remove ``tmp_path/flags/hold``)."""
    url = f"s3://{BUCKET}/{name}.zarr"
    config = held_job(tmp_path, url, **sections)
    config["output"]["storage_options"] = options(endpoint)
    if "cluster" not in sections:  # run with --scheduler
        config.pop("cluster")
    hold(tmp_path)
    return write_config(tmp_path, config), url


def remote_markers(url: str, endpoint: str) -> int:
    location.register(url, options(endpoint))
    try:
        return int(store.read_markers(url).sum())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def wait_remote(url: str, endpoint: str, count: int, proc, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while remote_markers(url, endpoint) < count and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    return remote_markers(url, endpoint)


def assert_same(url: str, endpoint: str, reference) -> None:
    ds = jacrun.load(url, storage_options=options(endpoint))
    np.testing.assert_array_equal(ds.vjp.values, reference.vjp.values)
    np.testing.assert_array_equal(ds.y.values, reference.y.values)


def test_a_worker_killed_then_the_scheduler_lost_on_s3_loses_nothing(tmp_path, endpoint, reference):
    processes = DaskProcesses(tmp_path)
    try:
        address = processes.start_scheduler()
        processes.start_workers(2)
        config, url = remote_fault_job(tmp_path, endpoint, "workerkill")
        proc = start_submit(config, "--scheduler", address, "--quiet")
        first = holding_process(tmp_path)
        os.kill(first, signal.SIGKILL)  # the held block runs again on the other worker
        (tmp_path / "flags" / f"holding-{first}").unlink()
        assert holding_process(tmp_path) != first
        processes.kill(processes.scheduler)
        _, stderr = finish(proc, 240)
        assert proc.returncode == 1 and "lost the connection to the scheduler" in stderr, stderr
        processes.stop()
        before = remote_markers(url, endpoint)
        assert before < HELD_BLOCKS

        (tmp_path / "flags" / "hold").unlink()
        address = processes.start_scheduler()  # a new one: resume there
        processes.start_workers(1)
        result = run_cli("submit", str(config), "--scheduler", address, "--quiet")
        assert result.returncode == 0, result.stderr
    finally:
        processes.stop()
    assert_same(url, endpoint, reference)


def test_a_client_killed_mid_job_on_s3_resumes_with_the_rest(tmp_path, endpoint, reference):
    cluster = {"kind": "local", "workers": 2, "memory_limit": "1GiB", "dashboard": None}
    config, url = remote_fault_job(tmp_path, endpoint, "clientkill", cluster=cluster)
    proc = start_submit(config)
    try:
        assert wait_remote(url, endpoint, 3, proc) >= 3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = remote_markers(url, endpoint)
    (tmp_path / "flags" / "hold").unlink()
    result = run_cli("submit", str(config))
    assert result.returncode == 0, result.stderr
    assert f"{HELD_BLOCKS - done} of {HELD_BLOCKS} blocks to run" in result.stdout
    assert "took over the lease of a run that is gone" in result.stdout
    assert_same(url, endpoint, reference)


def test_a_denied_access_is_named_without_its_details():
    message = location.problem("s3://jobs/x.zarr", PermissionError("AccessDenied: key AKIA... not allowed"))
    assert message == "s3://jobs/x.zarr: access denied (check the credentials in the environment or profile)"


def test_an_s3_input_sizes_an_autodiff_function_with_its_options_opened_once(
    tmp_path, endpoint, scheduler_address, monkeypatch
):
    """n_in comes from a Zarr input at a custom endpoint (its storage_options), and prepare
    opens that input once for sizing, checking and calibrating."""
    pytest.importorskip("autograd")
    from jacrun import sources
    from jacrun.prepare import prepare
    from tests.test_n_in_from_inputs import autodiff_job

    x = np.random.default_rng(3).standard_normal((24, 4))
    url = f"s3://{BUCKET}/inputs/autodiff-x.zarr"
    zarr.open_array(
        zarr.storage.FsspecStore.from_url(url, storage_options=options(endpoint)),
        mode="w",
        shape=x.shape,
        dtype=x.dtype,
    )[...] = x
    inputs = {"kind": "zarr", "path": url, "storage_options": options(endpoint, secret=True)}
    config = write_config(tmp_path, autodiff_job(tmp_path, inputs))
    for command in (["validate"], ["check"], ["submit", "--scheduler", scheduler_address, "--quiet"]):
        result = invoke(*command, str(config))
        assert result.exit_code == 0, result.output
    assert "(4 -> 4)" in invoke("validate", str(config)).output
    vjp = np.asarray(zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["vjp"]).reshape(24, 4)
    np.testing.assert_allclose(vjp, 2.0 * (1.0 - np.tanh(x) ** 2))

    opened = []
    real = sources._open_array
    monkeypatch.setattr(sources, "_open_array", lambda *args: opened.append(args[0]) or real(*args))
    prepare(jacrun.load_config(config), calibrate=True, estimate=True)
    assert opened == [url]
