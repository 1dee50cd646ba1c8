"""The active subspace of a scalar MLP as a job: reductions over samples, products not stored.

``mlp`` sizes [64, 256, 256, 1], ``vectors: ones`` (the gradient), ``reduce: [gram]`` and
``output.products: false``, float64:

- in process: the vjp kernel plus the Gram's update (``Reducer.partials``) on block-sized
  batches, on every core: the work a block does, without Dask, the store or the inputs;
- end to end: ``jacrun.submit`` on a 2-worker local cluster at N and 8N samples, its throughput
  against the in-process rate, its workers' peak memory against the plan's projection, and the
  size of the store;
- the same Gram from a 1-worker and a 2-worker cluster, compared bit for bit.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sparse import _WorkerMemory, warm_cluster

    store = folder / f"reduce-{samples}-{workers}.zarr"
    with warm_cluster(workers) as (address, pids):
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


def run(quick: bool, log: Callable[[str], None]) -> str:
    """The reductions section of the report (markdown)."""
    n = 20_000 if quick else 1_250_000
    block = 2_500 if quick else 32_768
    reps = 3 if quick else 7
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        jobs = []
        for samples in (n, 8 * n):
            log(f"  active subspace: {samples:,} samples on 2 workers")
            jobs.append(run_job(samples, folder, 2, block))
            log(f"  {jobs[-1].seconds:.1f} s")
        log("  the same Gram on 1 worker")
        single = run_job(n, folder, 1, block)
    log("  in process: kernel plus Gram update")
    rate = in_process_rate(block, reps)
    lines = [
        "## Reductions: the active subspace of a scalar MLP",
        "",
        f"mlp {SIZES} tanh, float64, `vectors: ones`, `reduce: [gram]`, `products: false`; 2 workers "
        f"x 1 thread, blocks of {block:,} samples. In process: vjp plus the Gram's partial on "
        f"{block:,}-row batches on "
        f"every core, {rate:,.0f} samples/s (median of {reps}).",
        "",
        "| samples | blocks | seconds (computing) | samples/s | of in-process | projected / peak memory "
        "per worker | store |",
        "|---|---|---|---|---|---|---|",
    ]
    for job in jobs:
        per_second = job.samples / job.compute_seconds
        within = "within" if job.peak_increase <= job.projected else "OVER"
        lines.append(
            f"| {job.samples:,} | {job.blocks} | {job.seconds:.1f} ({job.compute_seconds:.1f}) | "
            f"{per_second:,.0f} | {per_second / rate:.0%} | {job.projected / 2**20:.0f} / "
            f"{job.peak_increase / 2**20:.0f} MiB ({within}) | {job.store_bytes / 1024:,.0f} KiB |"
        )
    growth = jobs[1].peak_increase / max(jobs[0].peak_increase, 1) - 1
    same = np.array_equal(single.gram, jobs[0].gram)
    lines += [
        "",
        f"Peak worker memory at 8N against N: {growth:+.1%}. The Gram from 1 worker and from 2 "
        f"workers: {'identical to the last bit' if same else 'DIFFERENT'}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        print(run(args.quick, lambda m: print(m, file=sys.stderr, flush=True)))
