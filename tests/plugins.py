"""Test-only functions that misbehave on purpose, imported by workers through ``kind: python``."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import numpy as np

from jacrun.functions import Function


class Tripwire(Function):
    """y = sin(x), exact VJP/JVP; a block whose first row starts at ``trigger`` trips.

    ``action``: ``raise`` (every time), ``raise-once`` (the first time per trigger, recorded in
    ``flag_dir``), ``kill`` (SIGKILL its own worker process while ``flag_dir/armed`` exists),
    ``fill`` (fill the file system of ``flag_dir`` with ``flag_dir/filler`` while ``armed`` exists),
    ``hold`` (wait while ``flag_dir/hold`` exists, its process id in ``flag_dir/holding-PID``: a
    job that stays mid-way until released).
    """

    def __init__(
        self,
        n: int = 3,
        trigger: float = 999.0,
        action: str = "raise",
        flag_dir: str | None = None,
        dtype: str = "float64",
    ) -> None:
        self.n_in = self.n_out = n
        self.dtype = np.dtype(dtype)
        self.trigger, self.action, self.flag_dir = trigger, action, flag_dir

    def _trip(self, x: np.ndarray) -> None:
        if not np.any(x[:, 0] == self.trigger):
            return
        flags = Path(self.flag_dir or ".")
        if self.action == "raise":
            raise RuntimeError(f"tripwire at {self.trigger}")
        if self.action == "raise-once":
            flag = flags / f"tripped-{os.getpid()}-{self.trigger}"
            if not any(flags.glob(f"tripped-*-{self.trigger}")):
                flag.write_text("1")
                raise RuntimeError(f"tripwire at {self.trigger} (first time)")
        if self.action == "kill" and (flags / "armed").exists():
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "fill" and (flags / "armed").exists():
            _fill(flags / "filler")
        if self.action == "hold" and (flags / "hold").exists():
            (flags / f"holding-{os.getpid()}").write_text("")  # which process holds it
            while (flags / "hold").exists():
                time.sleep(0.02)

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        self._trip(x)
        return np.sin(x)

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.forward_batch(x), v * np.cos(x)[:, None, :]

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.forward_batch(x), t * np.cos(x)[:, None, :]


class WrongVJP(Function):
    """y = sin(x) with a VJP that is off by ``factor`` (a bug the checks must catch)."""

    def __init__(self, n: int = 3, factor: float = 1.01, dtype: str = "float64") -> None:
        self.n_in = self.n_out = n
        self.dtype = np.dtype(dtype)
        self.factor = factor

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        return np.sin(x)

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.sin(x), self.factor * v * np.cos(x)[:, None, :]

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.sin(x), t * np.cos(x)[:, None, :]


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until its file system has no space left."""
    block = bytes(2**20)
    with open(path, "ab", buffering=0) as file:
        try:
            while True:
                file.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


class BatchRecorder(Function):
    """y = sin(x), exact VJP/JVP; appends the batch size of every kernel call to ``record``."""

    def __init__(self, record: str, n: int = 3) -> None:
        self.n_in = self.n_out = n
        self.dtype = np.dtype("float64")
        self.record = Path(record)

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        with self.record.open("a") as file:
            file.write(f"{x.shape[0]}\n")
        return np.sin(x)

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.forward_batch(x), v * np.cos(x)[:, None, :]

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.forward_batch(x), t * np.cos(x)[:, None, :]


class Sleepy(Function):
    """y = sin(x), exact VJP/JVP; every batch sleeps ``delay`` seconds first, so that a job's
    length is set by its block count, not by this machine's speed.

    With ``log_dir``, each computation of a batch leaves a file there: the batch's first input
    (which block it was), the worker's process id, and when it started and ended.
    """

    def __init__(self, n: int = 3, delay: float = 0.0, log_dir: str | None = None) -> None:
        self.n_in = self.n_out = n
        self.dtype = np.dtype("float64")
        self.delay, self.log_dir = delay, log_dir

    def _sleep(self, x: np.ndarray) -> None:
        import time
        import uuid

        start = time.time()
        time.sleep(self.delay)
        if self.log_dir:
            record = f"{x[0, 0]!r} {os.getpid()} {start!r} {time.time()!r}"
            (Path(self.log_dir) / uuid.uuid4().hex).write_text(record)

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        self._sleep(x)
        return np.sin(x)

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._sleep(x)
        return np.sin(x), v * np.cos(x)[:, None, :]

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._sleep(x)
        return np.sin(x), t * np.cos(x)[:, None, :]
