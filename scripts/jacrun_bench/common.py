"""What every section shares: the problem sizes, the timing rounds, the run's context, targets."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Shapes:
    """The problem sizes of one run."""

    sizes: tuple[int, ...]  # MLP widths n, hidden..., m
    batch: int  # samples of the vjp/jvp rows (one vector per sample)
    jacobian_batch: int  # samples of the Jacobian rows
    l96_dim: int
    l96_steps: int
    l96_batch: int
    gemm: int  # side of the square GEMM that measures the peak
    reps: int  # timed rounds (medians)
    e2e_samples: int  # N of the end-to-end jobs (the large one has 8N)
    e2e_sizes: tuple[int, ...]
    e2e_block: int  # samples per block (the same in both jobs, so their memory compares)
    e2e_jacobian_samples: int  # samples of the end-to-end Jacobian job
    e2e_jacobian_block: int


FULL = Shapes(
    sizes=(512, 1024, 1024, 256),
    batch=4096,
    jacobian_batch=256,
    l96_dim=40,
    l96_steps=100,
    l96_batch=4096,
    gemm=2048,
    reps=7,
    e2e_samples=87_500,  # 8N = 700,000 samples: 2.15 GB of vjp + y in float32
    e2e_sizes=(512, 1024, 1024, 256),
    e2e_block=8192,
    e2e_jacobian_samples=4096,  # 4096 x 256 x 512 float32: 2.15 GB of Jacobians
    e2e_jacobian_block=64,
)
QUICK = Shapes(
    sizes=(64, 128, 128, 32),
    batch=256,
    jacobian_batch=16,
    l96_dim=40,
    l96_steps=10,
    l96_batch=256,
    gemm=256,
    reps=3,
    e2e_samples=2_000,
    e2e_sizes=(64, 128, 128, 32),
    e2e_block=500,
    e2e_jacobian_samples=200,
    e2e_jacobian_block=50,
)

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Context:
    """What a section's ``measure`` gets: the run's options, and the results of the sections
    before it (``results[name]``, None for a skipped one)."""

    shapes: Shapes
    quick: bool = False
    frameworks: dict[str, str] = field(default_factory=dict)
    """framework -> its version, or why it is left out ("not installed", "skipped")."""
    only: str | None = None
    """Keep the kernel rows whose name contains this."""
    log: Log = stderr_log
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One row of the targets table: ``value`` (None: not measured) against ``goal``, met at or
    above it (``below``: met under it)."""

    what: str
    value: float | None
    goal: float
    fmt: str = "{:.2f}x"
    below: bool = False

    def row(self) -> str:
        if self.value is None:
            return f"| {self.what} | not measured | - |"
        met = "yes" if (self.value < self.goal if self.below else self.value >= self.goal) else "**no**"
        return f"| {self.what} | {self.fmt.format(self.value)} | {met} |"


# ---- timing ----------------------------------------------------------------------------------

CONTENDER_PAUSE = 0.3
"""Seconds between two contenders: the thread pools of the one before (OpenBLAS, OpenMP in
torch, Eigen in XLA) stop spinning and leave the cores to the next one. Right after a torch
call, a jacrun Jacobian measured 7% slower than after a 1 s pause; 50 ms was not enough."""
PAUSE = CONTENDER_PAUSE
"""The pause :func:`rounds` takes: none in a ``--quick`` run (see ``cli.run``)."""


def rounds(
    contenders: dict[str, Callable[[], Any]], reps: int, warmup: int = 2, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median seconds of each contender over ``reps`` rounds that run every contender once,
    or, given ``min_seconds``, again and again until that long has passed (seconds per call).

    A call of a few milliseconds right after the pause also times the wake-up of its thread
    pool's idle cores: on this VM a 2-thread call of 10 ms took 17 ms after 50 ms idle.
    ``min_seconds`` makes that a small share of what is timed."""
    for _ in range(warmup):
        for run in contenders.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, run in contenders.items():
            time.sleep(PAUSE)
            start = time.perf_counter()
            calls, elapsed = 0, 0.0
            while calls == 0 or elapsed < min_seconds:
                run()
                calls += 1
                elapsed = time.perf_counter() - start
            times[name].append(elapsed / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def gemm_probe(size: int, dtype: str) -> tuple[Callable[[], Any], float]:
    """A square ``np.matmul(a, b, out=c)`` and its FLOPs: the NumPy GEMM peak of this machine."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    c = np.empty_like(a)
    return (lambda: np.matmul(a, b, out=c)), 2.0 * size**3


def rel_diff(a: Any, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def steps_table(seconds: dict[str, float]) -> list[str]:
    """Markdown rows: each step's time (ms) and share of one block, then the total."""
    total = sum(seconds.values())
    lines = ["| step | time | share |", "|---|---:|---:|"]
    lines += [f"| {step} | {value * 1e3:,.1f} ms | {value / total:.0%} |" for step, value in seconds.items()]
    return [*lines, f"| total | {total * 1e3:,.1f} ms | 100% |"]
