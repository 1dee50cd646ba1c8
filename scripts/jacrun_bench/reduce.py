"""Section ``reduce``: the active subspace of a scalar MLP as a job, products not stored.

``mlp`` sizes [64, 256, 256, 1], ``vectors: ones`` (the gradient), ``reduce: [gram]`` and
``output.products: false``, float64:

- in process: the vjp kernel plus the Gram's update (``Reducer.partials``) on block-sized
  batches, on every core: the work a block does, without Dask, the store or the inputs;
- end to end: ``jacrun.submit`` on a 2-worker local cluster at N and 8N samples (blocks of the
  same size), its throughput against the in-process rate, its workers' peak memory against the
  plan's projection, and the size of the store;
- the same Gram from a 1-worker and a 2-worker cluster, compared bit for bit.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jacrun_bench.common import Context, Target

NAME = "reduce"
TITLE = "Reductions: the active subspace of a scalar MLP"
HELP = "skip the active-subspace job (reduce: gram, products: false)"
SIZES = [64, 256, 256, 1]


def job_config(samples: int, store: Path, chunk: int | str = "auto") -> dict[str, Any]:
    return {
        "name": f"bench-reduce-{samples}",
        "mode": "vjp",
        "function": {"kind": "mlp", "sizes": SIZES, "activation": "tanh", "seed": 0},
        "inputs": {"kind": "random", "samples": samples, "seed": 1},
        "vectors": {"kind": "ones"},
        "reduce": ["gram"],
        "output": {"store": str(store), "products": False, "save_outputs": False, "overwrite": True},
        "chunks": {"samples": chunk},
        "cluster": {"kind": "local", "workers": 2, "memory_limit": "4GiB", "dashboard": None},
    }


def in_process_rate(rows: int, reps: int) -> float:
    """Samples per second of the kernel plus the Gram's partial on ``rows``-row batches."""
    import jacrun
    from jacrun.prepare import prepare
    from jacrun.sources import RandomRows

    config = jacrun.config_from_dict(job_config(rows, Path("unused.zarr"), rows))
    job = prepare(config, calibrate=False)
    f, reducer = job.function, job.reducer
    x = RandomRows(rows, f.n_in, "normal", 1).read(0, rows, f.dtype)
    ones = np.broadcast_to(np.ones((1, f.n_out), f.dtype), (rows, 1, f.n_out))

    def once() -> None:
        _, result = f.vjp_batch(x, ones)
        reducer.partials(result)

    once()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


@dataclass
class ReduceJob:
    samples: int
    blocks: int
    seconds: float
    compute_seconds: float
    projected: int
    peak_increase: int
    store_bytes: int
    gram: np.ndarray


def run_job(samples: int, folder: Path, workers: int, chunk: int) -> ReduceJob:
    """One job on a fresh ``workers``-worker local cluster, its workers' memory sampled."""
    import jacrun
    from jacrun_bench.e2e import local_cluster
    from jacrun_bench.sparse_jobs import _WorkerMemory

    store = folder / f"reduce-{samples}-{workers}.zarr"
    with local_cluster(workers) as (address, fresh_workers, _):
        pids = fresh_workers()
        config = jacrun.config_from_dict(job_config(samples, store, chunk))
        sampler = _WorkerMemory(pids)
        start = time.perf_counter()
        with sampler:
            summary = jacrun.submit(config, progress=False, scheduler=address)
        seconds = time.perf_counter() - start
    assert summary.ok, summary.failures
    ds = jacrun.load(store)
    attrs = ds.attrs["jacrun"]
    result = ReduceJob(
        samples=samples,
        blocks=attrs["plan"]["n_blocks"],
        seconds=seconds,
        compute_seconds=attrs["throughput"]["compute_seconds"],
        projected=attrs["plan"]["memory_per_block"],
        peak_increase=sampler.peak_increase,
        store_bytes=sum(p.stat().st_size for p in store.rglob("*") if p.is_file()),
        gram=ds.gram.values,
    )
    shutil.rmtree(store, ignore_errors=True)
    return result


@dataclass
class ReduceResult:
    jobs: list[ReduceJob]
    single: ReduceJob
    rate: float
    block: int
    reps: int

    @property
    def growth(self) -> float:
        return self.jobs[1].peak_increase / max(self.jobs[0].peak_increase, 1) - 1

    @property
    def identical(self) -> bool:
        return bool(np.array_equal(self.single.gram, self.jobs[0].gram))

    def ratio(self, job: ReduceJob) -> float:
        return job.samples / job.compute_seconds / self.rate


def measure(ctx: Context) -> ReduceResult:
    n = 10_000 if ctx.quick else 1_250_000  # 8N = 10 million samples
    block = 2_500 if ctx.quick else 32_768
    reps = 3 if ctx.quick else 7
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        jobs = []
        for samples in (n, 8 * n):
            ctx.log(f"  active subspace: {samples:,} samples on 2 workers")
            jobs.append(run_job(samples, folder, 2, block))
            ctx.log(f"  {jobs[-1].seconds:.1f} s")
        ctx.log("  the same Gram on 1 worker")
        single = run_job(n, folder, 1, block)
    ctx.log("  in process: kernel plus Gram update")
    return ReduceResult(jobs, single, in_process_rate(block, reps), block, reps)


def render(result: ReduceResult, ctx: Context) -> str:
    lines = [
        f"mlp {SIZES} tanh, float64, `vectors: ones`, `reduce: [gram]`, `products: false`; 2 workers "
        f"x 1 thread, blocks of {result.block:,} samples. In process: vjp plus the Gram's partial on "
        f"{result.block:,}-row batches on every core, {result.rate:,.0f} samples/s (median of "
        f"{result.reps}).",
        "",
        "| samples | blocks | seconds (computing) | samples/s | of in-process | projected / peak memory "
        "per worker | store |",
        "|---|---|---|---|---|---|---|",
    ]
    for job in result.jobs:
        within = "within" if job.peak_increase <= job.projected else "OVER"
        lines.append(
            f"| {job.samples:,} | {job.blocks} | {job.seconds:.1f} ({job.compute_seconds:.1f}) | "
            f"{job.samples / job.compute_seconds:,.0f} | {result.ratio(job):.0%} | "
            f"{job.projected / 2**20:.0f} / {job.peak_increase / 2**20:.0f} MiB ({within}) | "
            f"{job.store_bytes / 1024:,.0f} KiB |"
        )
    same = "identical to the last bit" if result.identical else "DIFFERENT"
    lines += [
        "",
        f"Peak worker memory at 8N against N: {result.growth:+.1%}. The Gram from 1 worker and from "
        f"2 workers: {same}.",
    ]
    return "\n".join(lines)


def targets(result: ReduceResult | None) -> list[Target]:
    if result is None:
        return []
    large = result.jobs[1]
    return [
        Target(
            "active subspace: end to end >= 80% of in-process kernel + Gram",
            result.ratio(large),
            0.8,
            "{:.0%}",
        ),
        Target(
            "active subspace: peak worker memory / projection (8N)",
            large.peak_increase / large.projected,
            1.0,
            "{:.2f}",
            below=True,
        ),
        Target("active subspace: memory 8N vs N", result.growth, 0.10, "{:+.1%}", below=True),
        Target(
            "active subspace: store size (MB)",
            max(j.store_bytes for j in result.jobs) / 1e6,
            1.0,
            "{:.3f}",
            below=True,
        ),
        Target(
            "active subspace: Gram from 1 and 2 workers bit-identical", float(result.identical), 1.0, "{:.0f}"
        ),
    ]
