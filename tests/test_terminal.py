"""What a user sees and what listens: the dashboard's port, and no library's lines on the terminal.

Everything runs through the real ``jacrun`` command in a subprocess, with a real LocalCluster.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import psutil
import pytest

from tests.helpers import held_job, hold, job_config, run_cli, start_submit, wait_for_markers, write_config

FOREIGN = re.compile(
    r"Warning\b|warnings\.warn|\.py:\d+|Traceback|site-packages|^\s+File |distributed\.\w+ - ", re.MULTILINE
)
"""What only a library's or Python's own output looks like: a warning with its file and source
line, a traceback, a distributed log record."""


@contextmanager
def held_port() -> Iterator[int]:
    """A loopback port that this test holds open (listening), so nothing else can bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS hands out ephemeral ports in turn)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def speaks_http(port: int) -> bool:
    """Whether something on 127.0.0.1:port answers an HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        connection.getresponse()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on."""
    return {
        c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN
    }


@pytest.mark.parametrize("dashboard", ["null", "port"])
def test_dashboard_null_serves_nothing(tmp_path, dashboard):
    """The config puts the dashboard on a free port. As it is, that port answers HTTP (so the
    probe can tell); with ``--set cluster.dashboard=null`` neither it nor any other port of the
    submitting process (the scheduler's) does."""
    port = free_port()
    job = held_job(tmp_path)
    job["cluster"] = {
        **job["cluster"],
        "dashboard": f"127.0.0.1:{port}",
    }  # a worker free beside the held block
    path = write_config(tmp_path, job)
    hold(tmp_path)
    proc = start_submit(path, *(["--set", "cluster.dashboard=null"] if dashboard == "null" else []))
    try:
        assert wait_for_markers(tmp_path / "held.zarr", 1, proc) >= 1, "the job did not start"
        ports = listening_ports(proc.pid)
        assert ports, "the scheduler's own port should be listed"
        answering = {p for p in ports if speaks_http(p)}
        if dashboard == "null":
            assert answering == set()
            assert not speaks_http(port)
        else:
            assert answering == {port}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    expected = "Dashboard: off" if dashboard == "null" else f"Dashboard: http://127.0.0.1:{port}/status"
    assert expected in out


def test_every_line_is_jacruns_own(tmp_path):
    """A job whose kernel overflows (NumPy warnings in the workers and in process), with its
    dashboard port taken (distributed's UserWarning): each command prints only jacrun's lines."""
    np.save(tmp_path / "big.npy", np.full((30, 5), 1e200))
    function = {"kind": "mlp", "sizes": [5, 8, 3], "seed": 0, "activation": "gelu"}
    with held_port() as port:
        cluster = {"kind": "local", "workers": 1, "memory_limit": "1GiB", "dashboard": f"127.0.0.1:{port}"}
        raw = job_config(
            function=function, inputs={"kind": "npy", "path": "big.npy"}, cluster=cluster, chunks=None
        )
        path = write_config(tmp_path, {**raw, "nan_policy": "propagate"})
        store = str(tmp_path / "out.zarr")
        runs = {
            "validate": run_cli("validate", str(path)),
            "plan": run_cli("plan", str(path)),
            "check": run_cli("check", str(path)),
            "submit": run_cli("submit", str(path)),
            "show": run_cli("show", store),
            "status": run_cli("status", store),
        }
    codes = {name: run.returncode for name, run in runs.items()}
    assert codes == {"validate": 0, "plan": 0, "check": 1, "submit": 0, "show": 0, "status": 0}, runs
    for name, run in runs.items():
        assert not FOREIGN.search(run.stdout + run.stderr), f"{name}:\n{run.stdout}{run.stderr}"
    submit = runs["submit"]
    assert re.search(
        rf"Dashboard: port {port} is taken; serving on http://127\.0\.0\.1:\d+/status", submit.stdout
    )
    assert submit.stderr == ""
    assert runs["check"].stderr.startswith("checks failed:") and runs["check"].stderr.count("\n") == 1
    assert "non-finite values" in runs["show"].stdout


WARNING_FACTORY = """
import warnings
from collections.abc import Callable

import autograd.numpy as anp
from zarr.errors import ZarrUserWarning


def make(scale: float) -> Callable:
    warnings.warn("scale is large;\\n results may overflow")
    warnings.warn("a library's own category", ZarrUserWarning, stacklevel=2)
    warnings.warn("an API to be removed", DeprecationWarning)

    def f(x):
        return scale * anp.tanh(x)

    return f
"""


def test_a_users_warning_is_one_line_and_a_librarys_is_not_shown(tmp_path):
    pytest.importorskip("autograd")
    (tmp_path / "warning_factory.py").write_text(WARNING_FACTORY)
    function = {
        "kind": "python",
        "autodiff": "autograd",
        "batched": True,
        "target": "warning_factory:make",
        "path": ".",
        "n_in": 3,
        "params": {"scale": 2.0},
    }
    path = write_config(tmp_path, job_config(function=function))
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "warning: scale is large; results may overflow (UserWarning)\n"
