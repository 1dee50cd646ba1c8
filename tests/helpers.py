"""Helpers shared by the tests: job configs, the CLI in a subprocess, relative errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DASK = [str(Path(sys.executable).with_name("dask"))]  # the real `dask` command of this environment


@pytest.fixture(autouse=True)
def fresh_targets() -> Iterator[None]:
    """For modules that import it: sys.path restored and kind: python targets forgotten after
    each test (targets are cached per process, and tests add their folders to sys.path)."""
    from jacrun.functions.python import clear_cache

    saved = list(sys.path)
    yield
    sys.path[:] = saved
    clear_cache()


def write_config(folder: Path, config: dict, name: str = "job.yaml") -> Path:
    """Write ``config`` as YAML into ``folder`` and return the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def job_config(store: str = "out.zarr", **sections) -> dict:
    """A small valid job (linear 5 -> 3, vjp, 3 random cotangents) with sections replaced."""
    config = {
        "name": "test",
        "mode": "vjp",
        "function": {"kind": "linear", "n_in": 5, "n_out": 3, "seed": 0},
        "inputs": {"kind": "random", "samples": 100, "seed": 1},
        "vectors": {"kind": "random", "count": 3, "seed": 2},
        "output": {"store": store},
        "chunks": {"samples": 32},
        "cluster": {"kind": "local", "workers": 1, "memory_limit": "1GiB", "dashboard": None},
    }
    for key, value in sections.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real ``jacrun`` command in a subprocess."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jacrun", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one stderr line of a command that refused bad input with exit 2 (no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown table rows whose first cell starts with ``first_cell``."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            rows.append(cells)
    return rows


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (the scale-free error used throughout the tests)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


HELD_BLOCKS = 10
"""Blocks of :func:`held_job`."""


def held_job(folder: Path, store: str = "held.zarr", **sections) -> dict:
    """A cheap job of 10 blocks of 20 rows (tests.plugins.Tripwire, y = sin x, 2 random vectors)
    whose last block waits while ``folder/flags/hold`` exists: with :func:`hold`, a run stays
    mid-way (the other blocks done) until the test kills it or removes the file. Its inputs are
    ``folder/held.npy``; 2 local workers unless ``cluster`` says otherwise (keep two: Dask may
    start the held block first, and one worker would then finish nothing)."""
    x = np.random.default_rng(0).normal(size=(20 * HELD_BLOCKS, 3))
    x[-1, 0] = 999.0
    np.save(folder / "held.npy", x)
    (folder / "flags").mkdir(exist_ok=True)
    function = {
        "kind": "python",
        "target": "tests.plugins:Tripwire",
        "path": str(REPO),
        "params": {"n": 3, "action": "hold", "flag_dir": str(folder / "flags")},
    }
    config = job_config(
        store,
        function=function,
        inputs={"kind": "npy", "path": str(folder / "held.npy")},
        vectors={"kind": "random", "count": 2},
        chunks={"samples": 20},
        cluster={"kind": "local", "workers": 2, "memory_limit": "1GiB", "dashboard": None},
    )
    config["name"] = "held"
    return {**config, **sections}


def hold(folder: Path) -> Path:
    """Make :func:`held_job`'s last block wait; remove the returned file to release it."""
    flag = folder / "flags" / "hold"
    flag.write_text("")
    return flag


def holding_process(folder: Path, timeout: float = 120) -> int:
    """The process id of the worker whose block :func:`hold` holds, once it holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((folder / "flags").glob("holding-*"))
        if found:
            return int(found[0].name.removeprefix("holding-"))
        time.sleep(0.02)
    raise TimeoutError("no block is held")


def start_submit(config: Path, *extra: str, merge_output: bool = False) -> subprocess.Popen:
    """``jacrun submit`` in its own process group (so the test can SIGKILL all of it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "jacrun", "submit", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
        preexec_fn=as_from_a_terminal,
    )


def as_from_a_terminal() -> None:
    """Ctrl-C's default disposition in a child process, as a shell gives a command. pytest-xdist
    workers ignore SIGINT, and an ignored signal stays ignored across exec: a ``jacrun submit``
    they start would never see a Ctrl-C (unless a test had set a handler in that worker)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The (stdout, stderr) of :func:`start_submit`'s process once it ends. Still running after
    ``timeout`` seconds: SIGABRT makes it print every thread's stack (faulthandler), and the
    test fails with them."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its workers
        pytest.fail(
            f"jacrun submit still running {timeout} s later; its threads:\n{err[-12000:]}\n{out[-2000:]}"
        )


def markers_done(store: Path) -> int:
    """Blocks marked done in a store (0 before it exists)."""
    import zarr

    try:
        return int(zarr.open_group(str(store), mode="r")["_blocks"][...].sum())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def wait_for_markers(store: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Poll until ``count`` blocks are done, the process ends, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while markers_done(store) < count and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return markers_done(store)


def kill_part_way(config: Path, store: Path, blocks: int, total: int) -> int:
    """``jacrun submit`` in a subprocess, SIGKILLed once ``blocks`` of ``total`` are done; the
    blocks done then (at least one, fewer than all)."""
    proc = start_submit(config)
    try:
        done = wait_for_markers(store, blocks, proc)
        assert 1 <= done < total, "the job ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return markers_done(store)


def read_scheduler_file(path: Path, timeout: float = 60) -> str:
    """The address a `dask scheduler --scheduler-file PATH` wrote, once it is there."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # written, then filled
    return json.loads(path.read_text())["address"]


class DaskProcesses:
    """A `dask scheduler` and `dask worker` processes, each a real OS process on 127.0.0.1.

    ``flags`` go to both (e.g. TLS certificates); ``security`` is what a client then needs.
    """

    def __init__(self, folder: Path, flags: Sequence[str] = (), security=None) -> None:
        self.folder = folder
        self.flags = list(flags)
        self.security = security
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.address = ""

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        handle = open(self.folder / log, "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [*DASK, *args, *self.flags], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_scheduler(self, protocol: str = "tcp") -> str:
        info = self.folder / f"scheduler-{time.monotonic_ns()}.json"
        self.scheduler = self._spawn(
            [
                "scheduler",
                "--protocol",
                protocol,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(info),
            ],
            "scheduler.log",
        )
        self.address = read_scheduler_file(info)
        return self.address

    def start_workers(self, count: int, *, nanny: bool = False) -> None:
        for _ in range(count):
            self.workers.append(
                self._spawn(
                    [
                        "worker",
                        self.address,
                        "--nthreads",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--memory-limit",
                        "2GiB",
                        "--nanny" if nanny else "--no-nanny",
                    ],
                    "workers.log",
                )
            )
        from distributed import Client

        with Client(self.address, timeout="30s", security=self.security, set_as_default=False) as client:
            client.wait_for_workers(len([w for w in self.workers if w.poll() is None]), timeout=60)

    def kill(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process is not None:
                self.kill(process)
        self.workers = []


def valid_colouring(pattern, colours: np.ndarray, direction: str) -> bool:
    """No two columns (fwd) or rows (rev) of one colour share a row (column): checked row by
    row, independently of jacrun's own check."""
    import scipy.sparse as sp

    p = sp.csr_array(pattern, dtype=np.int64)
    lines = p if direction == "fwd" else sp.csr_array(p.T)
    for i in range(lines.shape[0]):
        members = colours[lines.indices[lines.indptr[i] : lines.indptr[i + 1]]]
        if len(np.unique(members)) != len(members):
            return False
    return True
