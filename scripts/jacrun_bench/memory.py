"""Section ``memory``: the workers' peak memory in the end-to-end jobs against the plan's projection.

The ``e2e`` section samples each worker's resident set while its jobs run (:class:`RssSampler`);
this section reads those samples: the peak above a worker's idle size, per job, against the
plan's projected memory per block, and how much the peak grows from N samples to 8N.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jacrun_bench.common import Context, Target

if TYPE_CHECKING:
    from jacrun_bench.e2e import EndToEnd, Job

NAME = "memory"
TITLE = "Worker memory"
HELP = "leave the workers' memory out of the report (it is measured during the cluster jobs)"

MIB = 2**20


class RssSampler:
    """Peak resident memory of some processes, sampled every ``interval`` seconds in a thread,
    and the CPU seconds they and this process used while it ran (``cpu``, on exit)."""

    def __init__(self, pids: Sequence[int], interval: float = 0.01) -> None:
        import psutil

        self.processes = [psutil.Process(pid) for pid in pids]
        self.interval = interval
        self.peak = {p.pid: 0 for p in self.processes}
        self.cpu = {"workers": 0.0, "this process": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu_now(self) -> dict[str, float]:
        import psutil

        def used(process: psutil.Process) -> float:
            try:
                times = process.cpu_times()
            except psutil.Error:  # a worker that died (its job is then reported as failed)
                return math.nan
            return times.user + times.system

        return {"workers": sum(map(used, self.processes)), "this process": used(psutil.Process())}

    def current(self) -> dict[int, int]:
        return {p.pid: p.memory_info().rss for p in self.processes}

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, rss in self.current().items():
                self.peak[pid] = max(self.peak[pid], rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._cpu_start = self._cpu_now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = {who: seconds - self._cpu_start[who] for who, seconds in self._cpu_now().items()}


def warm_worker() -> int:
    """Import what a block imports, so a worker's idle size includes the libraries; its pid."""
    import zarr  # noqa: F401

    import jacrun.block  # noqa: F401
    import jacrun.store  # noqa: F401

    return os.getpid()


def jobs(e2e: EndToEnd) -> list[tuple[str, Job]]:
    """(name, job) of every job that ran."""
    named = [
        (f"N, {e2e.small.samples:,} samples", e2e.small),
        (f"8N, {e2e.large.samples:,} samples", e2e.large),
        ("8N, blosc", e2e.blosc),
        ("8N, no compression", e2e.uncompressed),
        ("Jacobians", e2e.jacobian),
    ]
    return [(name, job) for name, job in named if job is not None]


def growth(e2e: EndToEnd) -> float:
    """How much higher the peak above idle is at 8N than at N (0.05: 5%)."""
    return e2e.large.peak_increase / max(e2e.small.peak_increase, 1) - 1


def measure(ctx: Context) -> EndToEnd | None:
    return ctx.results.get("e2e")


def render(e2e: EndToEnd | None, ctx: Context) -> str:
    if e2e is None:
        return "Not measured (no cluster jobs: --skip-e2e)."
    lines = [
        "Resident set of each worker process, sampled every 10 ms during each job of the end-to-end "
        "section, from its idle size after importing jacrun (fresh worker processes for each job); "
        "the projection is the plan's memory per block.",
        "",
        "| job | worker idle RSS | peak RSS | peak - idle | projected per block | within projection |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, job in jobs(e2e):
        lines.append(
            f"| {name} | {job.idle_rss / MIB:,.0f} MiB | {job.peak_rss / MIB:,.0f} MiB | "
            f"{job.peak_increase / MIB:,.0f} MiB | {job.projected / MIB:,.0f} MiB | "
            f"{'yes' if job.peak_increase <= job.projected else 'NO'} |"
        )
    lines += ["", f"Peak worker memory above idle at 8N vs N: **{growth(e2e):+.1%}**."]
    return "\n".join(lines)


def targets(e2e: EndToEnd | None) -> list[Target]:
    """Every job's peak within its projection; the peak does not grow with the job's size."""
    if e2e is None:
        return []
    out = [
        Target(
            f"peak worker memory within projection ({name})",
            job.projected / max(job.peak_increase, 1),
            1.0,
            "{:.2f}x headroom",
        )
        for name, job in jobs(e2e)
    ]
    out.append(
        Target("peak worker memory < 10% higher at 8N than N", growth(e2e), 0.1, "{:+.1%}", below=True)
    )
    return out
