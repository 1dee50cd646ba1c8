"""The sparse section's jobs through ``jacrun.submit`` on a 2-worker local cluster: ``bratu``
(then killed part-way and resumed from the command line) and the 9-point residual through
``autodiff: jax`` (the fused path on the workers). Each reports its throughput, its workers'
peak memory against the plan's projection, and its blocks' steps."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jacrun_bench.residuals import LAM, STENCILS, C


@dataclass
class SparseJob:
    what: str
    grid: int
    samples: int
    blocks: int
    nonzeros: int
    seconds: float
    ok: bool
    projected: int
    peak_increase: int
    store_bytes: int
    max_error: float
    steps: dict[str, float] = field(default_factory=dict)
    """Workers' seconds per block step, summed over the blocks (the store's throughput)."""
    killed_after: int | None = None
    resumed_blocks: int | None = None
    resume_ok: bool | None = None


def job_config(grid: int, samples: int, store: Path, chunk: int | str, jax: bool = False) -> dict[str, Any]:
    """``bratu``, or (``jax``) the 9-point residual through ``autodiff: jax`` with its pattern
    detected by asdex."""
    function: dict[str, Any] = {"kind": "bratu", "grid": grid, "lam": LAM}
    extra: dict[str, Any] = {}
    if jax:
        function = {
            "kind": "python",
            "autodiff": "jax",
            "target": "stencil_residuals:allen_cahn_jax",
            "path": str(STENCILS),
            "params": {"grid": grid, "c": C},
        }
        extra = {"sparsity": "detect"}
    return {
        "name": f"bench-sparse-{'jax-' if jax else ''}{grid}",
        "mode": "jacobian",
        "function": function,
        **extra,
        "inputs": {"kind": "random", "samples": samples, "distribution": "uniform", "seed": 1},
        "output": {"store": str(store), "save_outputs": False},
        "chunks": {"samples": chunk},
        "cluster": {"kind": "local", "workers": 2, "memory_limit": "4GiB", "dashboard": None},
    }


def _import_jax() -> None:
    import jax  # noqa: F401 - on a worker: its runtime is then part of the idle size


Cluster = tuple[str, Callable[[], list[int]]]
"""A running local cluster: its address and ``fresh_workers()`` (see ``e2e.local_cluster``)."""


def run_job(
    settings: dict[str, Any], cluster: Cluster, warm: Callable[[], None] | None = None
) -> tuple[Any, float, int, dict]:
    """(summary, seconds, peak memory increase of a worker, store attributes) of one job on
    fresh workers (``warm`` runs on each before the idle size is taken)."""
    from distributed import Client

    import jacrun

    address, fresh_workers = cluster
    pids = fresh_workers()
    if warm is not None:
        with Client(address, set_as_default=False) as client:
            client.run(warm)
    config = jacrun.config_from_dict(settings)
    sampler = _WorkerMemory(pids)
    start = time.perf_counter()
    with sampler:
        summary = jacrun.submit(config, progress=False, scheduler=address)
    seconds = time.perf_counter() - start
    attrs = jacrun.store.read_attrs(settings["output"]["store"])
    return summary, seconds, sampler.peak_increase, attrs


def _stored_error(store: Path, function, sparse, samples: int) -> float:
    """The largest difference of 8 stored Jacobians from the in-process ones, relative."""
    import zarr

    from jacrun.sources import RandomRows

    rows = np.linspace(0, samples - 1, 8).astype(int)
    stored = zarr.open_group(str(store), mode="r")["jacobian"].get_orthogonal_selection((rows, slice(None)))
    inputs = RandomRows(samples, function.n_in, "uniform", 1)
    x = np.stack([inputs.read(int(r), int(r) + 1, function.dtype)[0] for r in rows])
    expected = sparse.evaluate(function, x)[1]
    return float(np.max(np.abs(stored - expected)) / np.max(np.abs(expected)))


def _summary(what, grid, samples, summary, seconds, peak, attrs, store: Path, error) -> SparseJob:
    plan = attrs["plan"]
    throughput = attrs.get("throughput") or {}
    return SparseJob(
        what=what,
        grid=grid,
        samples=samples,
        blocks=plan["n_blocks"],
        nonzeros=samples * plan["nnz"],
        seconds=seconds,
        ok=summary.ok,
        projected=plan["memory_per_block"],
        peak_increase=peak,
        store_bytes=sum(p.stat().st_size for p in store.rglob("*") if p.is_file()),
        max_error=error,
        steps=dict(throughput.get("block_seconds") or {}),
    )


def bench_bratu_job(
    grid: int, samples: int, chunk: int | str, folder: Path, cluster: Cluster, log: Callable[[str], None]
) -> SparseJob:
    """The ``bratu`` job once through ``jacrun.submit`` (workers' memory sampled), then from the
    command line in a subprocess killed part-way and resumed; the resumed store is checked
    against the kernel."""
    import yaml

    from jacrun.functions import build_function
    from jacrun.sparsity import choose

    store = folder / f"sparse-{grid}.zarr"
    settings = job_config(grid, samples, store, chunk)
    summary, seconds, peak, attrs = run_job(settings, cluster)
    f = build_function({"kind": "bratu", "grid": grid, "lam": LAM})
    sparse = choose(f.sparsity(), "auto", "declared")
    job = _summary("bratu", grid, samples, summary, seconds, peak, attrs, store, 0.0)
    log(f"  bratu job: {samples} samples in {seconds:.1f} s, peak +{peak / 2**20:.0f} MiB")

    shutil.rmtree(store)
    path = folder / "sparse-job.yaml"
    path.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "jacrun", "submit", str(path), "--quiet"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(command, start_new_session=True, **quiet)
    target = max(1, job.blocks // 3)
    while _markers(store) < target and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    job.killed_after = _markers(store)
    again = subprocess.run(command, capture_output=True, text=True)
    job.resumed_blocks = _markers(store) - job.killed_after
    job.resume_ok = again.returncode == 0 and _markers(store) == job.blocks
    job.max_error = _stored_error(store, f, sparse, samples)
    shutil.rmtree(store, ignore_errors=True)
    log(f"  killed after {job.killed_after} of {job.blocks} blocks; resumed {job.resumed_blocks}")
    return job


def bench_jax_job(
    grid: int, samples: int, chunk: int | str, folder: Path, cluster: Cluster, log: Callable[[str], None]
) -> SparseJob:
    """The 9-point residual through ``autodiff: jax`` (pattern detected) on fresh workers that
    have imported JAX before their idle size is taken; the store is checked against the NumPy
    Function's nonzeros."""
    import zarr

    from jacrun.sparsity import SparseJacobian
    from jacrun_bench.residuals import numpy_allen_cahn

    store = folder / f"sparse-jax-{grid}.zarr"
    settings = job_config(grid, samples, store, chunk, jax=True)
    summary, seconds, peak, attrs = run_job(settings, cluster, warm=_import_jax)
    f = numpy_allen_cahn(grid)
    colours = zarr.open_group(str(store), mode="r")["colours"][...]
    sparse = SparseJacobian.from_pattern(f.sparsity(), attrs["sparsity"]["mode"], colours)
    error = _stored_error(store, f, sparse, samples)
    job = _summary("9-point, autodiff: jax", grid, samples, summary, seconds, peak, attrs, store, error)
    shutil.rmtree(store, ignore_errors=True)
    log(f"  jax job: {samples} samples in {seconds:.1f} s, peak +{peak / 2**20:.0f} MiB")
    return job


def _markers(store: Path) -> int:
    import zarr

    try:
        return int(zarr.open_group(str(store), mode="r")["_blocks"][...].sum())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


class _WorkerMemory:
    """The largest growth of a worker's resident memory over its idle (warm) size."""

    def __init__(self, pids: list[int]) -> None:
        from jacrun_bench.memory import RssSampler

        self.sampler = RssSampler(pids)
        self.idle = self.sampler.current()
        self.peak_increase = 0

    def __enter__(self) -> _WorkerMemory:
        self.sampler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sampler.__exit__(*exc)
        self.peak_increase = max(self.sampler.peak[pid] - idle for pid, idle in self.idle.items())


def job_table(jobs: list[SparseJob], rates: dict[str, float]) -> str:
    """One row per job; ``rates`` maps a job's ``what`` to its in-process Jacobians/s."""
    lines = [
        "| job | L | samples | nonzeros | blocks | seconds | Jacobians/s | of in-process | block steps "
        "| projected / peak memory per worker | store | kill, resume |",
        "|---|---|---|---|---|---|---:|---:|---|---|---|---|",
    ]
    for job in jobs:
        rate = job.samples / job.seconds
        share = f"{rate / rates[job.what]:.0%}" if rates.get(job.what) else "-"
        memory = f"{job.projected / 2**20:.0f} / {job.peak_increase / 2**20:.0f} MiB"
        within = "within" if job.peak_increase <= job.projected else "OVER"
        total = sum(job.steps.values())
        steps = ", ".join(
            f"{step} {value / total:.0%}"
            for step, value in sorted(job.steps.items(), key=lambda kv: -kv[1])
            if total and value / total >= 0.01
        )
        resume = "-"
        if job.resume_ok is not None:
            resume = (
                f"killed after {job.killed_after} of {job.blocks} blocks, resumed {job.resumed_blocks} "
                f"({'complete' if job.resume_ok else 'INCOMPLETE'})"
            )
        lines.append(
            f"| {job.what} | {job.grid} | {job.samples:,} | {job.nonzeros / 1e6:,.0f} M | {job.blocks} | "
            f"{job.seconds:.1f} | {rate:,.0f} | {share} | {steps or '-'} | {memory} ({within}) | "
            f"{job.store_bytes / 2**20:,.0f} MiB | {resume}; values within {job.max_error:.1e} |"
        )
    return "\n".join(lines)
