"""Section ``sparse``: sparse Jacobians of the 2-D Bratu residual against asdex and dense autodiff.

In process, per grid size L (n = m = L^2, float64, the same inputs for every contender):

- jacrun: ``SparseJacobian.evaluate`` on batches of samples, on every core (kernel threads),
  into a reused output buffer, the Jacobians only (as every contender); the colouring is
  computed once, before the timing. ``bratu`` forms the gathered products directly
  (``Bratu.sparse_nonzeros``);
- jacrun products: the same, the way a function without that shortcut gets its nonzeros:
  its ``vjp_batch`` on the seeds, then the gather;
- asdex (JAX sparse AD): ``jax.jit(asdex.jacobian_from_coloring(F, colouring))``, one sample at
  a time as asdex is used, its own colouring;
- dense ``jax.vmap(jax.jacfwd(F))`` and ``torch.func.vmap(torch.func.jacfwd(F))`` where a
  batch of dense Jacobians fits in memory.

Every contender's Jacobians are checked against jacrun's nonzeros. Then one job through
``jacrun.submit`` on a 2-worker local cluster: its throughput, its workers' peak memory against
the plan's projected memory per block, and a kill part-way and a resume from the command line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from jacrun_bench.common import Context, Target, rounds
from jacrun_bench.frameworks import usable

NAME = "sparse"
TITLE = "Sparse Jacobians (bratu, float64)"
HELP = "skip the sparse Jacobians (bratu against asdex and dense jax/torch, and its job)"
LAM = 6.0
MIN_SECONDS = 0.25
"""Each contender runs for at least this long per round: throughput, not a thread pool's wake-up."""


@dataclass
class SparseRow:
    grid: int
    nnz: int
    colours: int
    rates: dict[str, float]
    """Jacobians per second of each contender."""
    their_colours: int | None = None
    errors: dict[str, float] | None = None


def _jax_bratu(grid: int):
    import jax.numpy as jnp

    h2 = 1.0 / (grid + 1) ** 2

    def residual(u):
        v = u.reshape(grid, grid)
        p = jnp.pad(v, 1)
        r = 4 * v - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:] - LAM * h2 * jnp.exp(v)
        return r.ravel()

    return residual


def _torch_bratu(grid: int):
    import torch

    h2 = 1.0 / (grid + 1) ** 2

    def residual(u):
        v = u.reshape(grid, grid)
        p = torch.nn.functional.pad(v, (1, 1, 1, 1))
        r = 4 * v - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:] - LAM * h2 * torch.exp(v)
        return r.reshape(-1)

    return residual


def bench_grid(
    grid: int, samples: int, reps: int, frameworks: set[str], log: Callable[[str], None]
) -> SparseRow:
    """One row: jacrun, asdex and (small grids) dense jax/torch on ``samples`` inputs."""
    from jacrun.functions import build_function
    from jacrun.sources import random_rows
    from jacrun.sparsity import choose

    f = build_function({"kind": "bratu", "grid": grid, "lam": LAM})
    n = f.n_in
    sparse = choose(f.sparsity(), "auto", "declared")
    x = random_rows("uniform", 1, 1, 0, samples, n)
    out = np.empty((samples, sparse.nnz))
    products = _ProductsOnly(f)
    contenders: dict[str, Callable[[], Any]] = {
        "jacrun": lambda: sparse.evaluate(f, x, out=out, outputs=False),
        "jacrun products": lambda: sparse.evaluate(products, x, out=out, outputs=False),
    }
    counts = {"jacrun": samples, "jacrun products": samples}
    check: dict[str, Callable[[], Any]] = {}  # name -> sample 0's Jacobian, theirs
    their_colours = None
    if "jax" in frameworks:
        import jax

        jax.config.update("jax_enable_x64", True)
        residual = _jax_bratu(grid)
        try:
            import asdex
        except ImportError:
            asdex = None
        if asdex is not None:
            colouring = asdex.jacobian_coloring(residual, np.zeros(n))
            their_colours = int(colouring.num_colors)
            jac = jax.jit(asdex.jacobian_from_coloring(residual, colouring))
            counts["asdex"] = count = min(samples, 64)

            def run_asdex() -> None:
                for i in range(count):
                    last = jac(x[i])
                jax.block_until_ready(last)

            contenders["asdex"] = run_asdex
            check["asdex"] = lambda: _bcoo_to_csr(jac(x[0]))
        if n * n * 8 * min(samples, 16) < 1 << 30:
            dense = jax.jit(jax.vmap(jax.jacfwd(residual)))
            batch = x[: min(samples, 16)]
            counts["jax dense"] = len(batch)
            contenders["jax dense"] = lambda: jax.block_until_ready(dense(batch))
            check["jax dense"] = lambda: np.asarray(dense(batch)[0])
    if "torch" in frameworks and n <= 1024:  # dense torch: 22 Jacobians/s at n = 1024
        import torch
        from torch.func import jacfwd, vmap

        dense_t = vmap(jacfwd(_torch_bratu(grid)))
        batch_t = torch.from_numpy(x[: min(samples, 4)])
        counts["torch dense"] = len(batch_t)
        contenders["torch dense"] = lambda: dense_t(batch_t)
        check["torch dense"] = lambda: dense_t(batch_t)[0].numpy()
    seconds = rounds(contenders, reps, warmup=1, min_seconds=MIN_SECONDS)
    rates = {name: counts[name] / seconds[name] for name in contenders}
    for name, rate in rates.items():
        log(f"  L={grid}: {name} {rate:,.0f} Jacobians/s")
    sparse.evaluate(f, x[:1], out=out[:1])  # the `jacrun` row's Jacobian, which the others match
    errors = {name: _nonzero_error(sparse, out[0], theirs()) for name, theirs in check.items()}
    theirs = sparse.csr(sparse.evaluate(products, x[:1])[1][0])
    errors["jacrun products"] = _nonzero_error(sparse, out[0], theirs)
    return SparseRow(grid, sparse.nnz, sparse.n_colours, rates, their_colours, errors)


class _ProductsOnly:
    """``f`` without its ``sparse_nonzeros``: its kernel on the seeds, then the gather."""

    def __init__(self, f) -> None:
        self.dtype, self.jvp_batch, self.vjp_batch = f.dtype, f.jvp_batch, f.vjp_batch

    def sparse_nonzeros(self, x, sparse, out, outputs=True):
        return sparse.gather_products(self, x, out)


def _bcoo_to_csr(matrix) -> sp.csr_array:
    """A JAX BCOO matrix as a scipy CSR one (without densifying it)."""
    indices = np.asarray(matrix.indices)
    data = np.asarray(matrix.data)
    return sp.csr_array((data, (indices[:, 0], indices[:, 1])), shape=matrix.shape)


def _nonzero_error(sparse, values: np.ndarray, theirs) -> float:
    """max |J_theirs - J_jacrun| / max |J_jacrun| over every entry (theirs dense or scipy)."""
    ours = sparse.csr(values)
    difference = abs(sp.csr_array(theirs) - ours)
    return float(difference.max() / abs(ours).max())


# ---- the job ---------------------------------------------------------------------------------


@dataclass
class SparseJob:
    grid: int
    samples: int
    blocks: int
    nonzeros: int
    seconds: float
    ok: bool
    projected: int
    peak_increase: int
    store_bytes: int
    killed_after: int
    resumed_blocks: int
    resume_ok: bool
    max_error: float


def job_config(grid: int, samples: int, store: Path, chunk: int | str) -> dict[str, Any]:
    return {
        "name": f"bench-sparse-{grid}",
        "mode": "jacobian",
        "function": {"kind": "bratu", "grid": grid, "lam": LAM},
        "inputs": {"kind": "random", "samples": samples, "distribution": "uniform", "seed": 1},
        "output": {"store": str(store), "save_outputs": False},
        "chunks": {"samples": chunk},
        "cluster": {"kind": "local", "workers": 2, "memory_limit": "4GiB", "dashboard": None},
    }


def bench_job(
    grid: int, samples: int, chunk: int | str, folder: Path, log: Callable[[str], None]
) -> SparseJob:
    """The job once through ``jacrun.submit`` on a 2-worker local cluster (workers' memory
    sampled), then from the command line in a subprocess killed part-way and resumed; the
    resumed store is checked against the kernel."""
    import yaml
    import zarr

    import jacrun
    from jacrun.functions import build_function
    from jacrun.sources import RandomRows
    from jacrun.sparsity import choose

    store = folder / f"sparse-{grid}.zarr"
    settings = job_config(grid, samples, store, chunk)
    from jacrun_bench.e2e import local_cluster

    with local_cluster() as (address, fresh_workers, _):
        pids = fresh_workers()
        config = jacrun.config_from_dict(settings)
        sampler = _WorkerMemory(pids)
        start = time.perf_counter()
        with sampler:
            summary = jacrun.submit(config, progress=False, scheduler=address)
        seconds = time.perf_counter() - start
    attrs = jacrun.store.read_attrs(store)
    plan = attrs["plan"]
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    log(f"  job: {samples} samples in {seconds:.1f} s, peak +{sampler.peak_increase / 2**20:.0f} MiB")

    shutil.rmtree(store)
    path = folder / "sparse-job.yaml"
    path.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "jacrun", "submit", str(path), "--quiet"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(command, start_new_session=True, **quiet)
    target = max(1, plan["n_blocks"] // 3)
    while _markers(store) < target and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = _markers(store)
    again = subprocess.run(command, capture_output=True, text=True)
    resumed = _markers(store) - killed_after
    complete = again.returncode == 0 and _markers(store) == plan["n_blocks"]
    f = build_function({"kind": "bratu", "grid": grid, "lam": LAM})
    sparse = choose(f.sparsity(), "auto", "declared")
    rows = np.linspace(0, samples - 1, 8).astype(int)
    stored = zarr.open_group(str(store), mode="r")["jacobian"].get_orthogonal_selection((rows, slice(None)))
    inputs = RandomRows(samples, f.n_in, "uniform", 1)
    x = np.stack([inputs.read(int(r), int(r) + 1, f.dtype)[0] for r in rows])
    expected = sparse.evaluate(f, x)[1]
    error = float(np.max(np.abs(stored - expected)) / np.max(np.abs(expected)))
    shutil.rmtree(store, ignore_errors=True)
    log(f"  killed after {killed_after} of {plan['n_blocks']} blocks; resumed {resumed}")
    return SparseJob(
        grid=grid,
        samples=samples,
        blocks=plan["n_blocks"],
        nonzeros=samples * plan["nnz"],
        seconds=seconds,
        ok=summary.ok,
        projected=plan["memory_per_block"],
        peak_increase=sampler.peak_increase,
        store_bytes=store_bytes,
        killed_after=killed_after,
        resumed_blocks=resumed,
        resume_ok=complete,
        max_error=error,
    )


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


# ---- report ----------------------------------------------------------------------------------


def table(rows: list[SparseRow]) -> str:
    names = ["jacrun", "jacrun products", "asdex", "jax dense", "torch dense"]
    lines = [
        "| L | n | nonzeros | colours (jacrun / asdex) | "
        + " | ".join(f"{name} J/s" for name in names)
        + " | jacrun / asdex | jacrun products / asdex | jacrun / jax dense | agreement |",
        "|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for row in rows:
        rates = [f"{row.rates[name]:,.0f}" if name in row.rates else "-" for name in names]
        ratio = {k: _ratio(row, "jacrun", k) for k in names[2:4]}
        products = _ratio(row, "jacrun products", "asdex")
        errors = (row.errors or {}).values()
        worst = f"{max(errors):.1e}" if errors else "-"
        lines.append(
            f"| {row.grid} | {row.grid**2:,} | {row.nnz:,} | {row.colours} / {row.their_colours or '-'} | "
            + " | ".join(rates)
            + f" | {ratio['asdex']} | {products} | {ratio['jax dense']} | {worst} |"
        )
    return "\n".join(lines)


def _ratio(row: SparseRow, ours: str, theirs: str) -> str:
    return f"{row.rates[ours] / row.rates[theirs]:.2f}x" if theirs in row.rates else "-"


def job_table(job: SparseJob) -> str:
    memory = f"{job.projected / 2**20:.0f} / {job.peak_increase / 2**20:.0f} MiB"
    within = "within" if job.peak_increase <= job.projected else "OVER"
    resumed = "complete" if job.resume_ok else "INCOMPLETE"
    return "\n".join(
        [
            "| samples | nonzeros | blocks | seconds | Jacobians/s | projected / peak memory per worker "
            "| store | kill, resume |",
            "|---|---|---|---|---|---|---|---|",
            f"| {job.samples:,} | {job.nonzeros / 1e6:,.0f} M | {job.blocks} | {job.seconds:.1f} | "
            f"{job.samples / job.seconds:,.0f} | {memory} ({within}) | {job.store_bytes / 2**20:,.0f} MiB | "
            f"killed after {job.killed_after} of {job.blocks} blocks, resumed {job.resumed_blocks} "
            f"({resumed}), values within {job.max_error:.1e} of the kernel |",
        ]
    )


@dataclass
class SparseResult:
    rows: list[SparseRow]
    job: SparseJob
    reps: int


def measure(ctx: Context) -> SparseResult:
    frameworks = {name for name, version in ctx.frameworks.items() if usable(version)}
    grids = (8, 16) if ctx.quick else (32, 64, 128, 256)
    reps = ctx.shapes.reps  # 7 (--quick: 3), or --reps
    rows = []
    for grid in grids:
        samples = 8 if ctx.quick else max(8, min(512, 2**22 // grid**2))
        rows.append(bench_grid(grid, samples, reps, frameworks, ctx.log))
    job_grid, job_samples, chunk = (8, 100, 20) if ctx.quick else (256, 2000, "auto")
    with tempfile.TemporaryDirectory() as folder:
        job = bench_job(job_grid, job_samples, chunk, Path(folder), ctx.log)
    return SparseResult(rows, job, reps)


def render(result: SparseResult, ctx: Context) -> str:
    job = result.job
    return "\n".join(
        [
            f"Jacobians per second in process, medians of {result.reps} rounds of at least "
            f"{MIN_SECONDS} s each; jacrun on every core "
            "into a reused buffer, asdex one sample at a time (jit), dense jax/torch on a batch where "
            "it fits. `jacrun` is what a `bratu` job runs (the gathered products formed directly); "
            "`jacrun products` is the path of any other function (its VJPs on the seeds, then the "
            "gather). `agreement`: the largest entry difference from jacrun's Jacobian, relative to "
            "its largest entry.",
            "",
            table(result.rows),
            "",
            f"One job through `jacrun.submit` (L = {job.grid}, 2 workers), then killed part-way and "
            "resumed from the command line:",
            "",
            job_table(job),
        ]
    )


def targets(result: SparseResult | None) -> list[Target]:
    if result is None:
        return []
    by_grid = {row.grid: row for row in result.rows}
    out = []
    for grid in (128, 256):
        row = by_grid.get(grid)
        ratio = row.rates["jacrun"] / row.rates["asdex"] if row and "asdex" in row.rates else None
        out.append(Target(f"bratu L={grid}: >= 2x asdex Jacobians/s (bratu's own nonzeros)", ratio, 2.0))
        fewer = None if row is None or row.their_colours is None else row.their_colours - row.colours
        out.append(
            Target(f"bratu L={grid}: colours no more than asdex's (asdex - jacrun)", fewer, 0, "{:+.0f}")
        )
    row = by_grid.get(32)
    dense = row.rates["jacrun"] / row.rates["jax dense"] if row and "jax dense" in row.rates else None
    out.append(Target("bratu L=32: >= 100x dense jax.vmap(jax.jacfwd)", dense, 100.0, "{:.0f}x"))
    job = result.job
    out.append(
        Target(
            "sparse job: peak worker memory / projection",
            job.peak_increase / job.projected,
            1.0,
            "{:.2f}",
            below=True,
        )
    )
    out.append(Target("sparse job: resumed after a kill (1 = complete)", float(job.resume_ok), 1.0, "{:.0f}"))
    errors = [e for row in result.rows for e in (row.errors or {}).values()] + [job.max_error]
    out.append(
        Target(
            "values agree with dense Jacobians (max relative error)", max(errors), 1e-12, "{:.1e}", below=True
        )
    )
    return out
