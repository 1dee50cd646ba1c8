"""One block end to end, on a worker: read inputs -> kernel -> finiteness -> write -> marker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from jacrun.config import JobConfig
from jacrun.errors import storage_refusal
from jacrun.functions import Function
from jacrun.functions.base import block_kernel
from jacrun.memory import keep_freed_memory
from jacrun.plan import Plan
from jacrun.reduce import Reducer
from jacrun.sources import ArrayRows, RandomRows, VectorSource
from jacrun.sparsity import SparseJacobian
from jacrun.terminal import floating_point_quiet

_FUNCTIONS: dict[str, Function] = {}
_BLAS_THREADS: list[int] = []


def limit_blas(threads: int) -> None:
    """Limit this process's BLAS/OpenMP pools to ``threads`` (once; threadpoolctl is not free)."""
    if [threads] != _BLAS_THREADS:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
        _BLAS_THREADS[:] = [threads]


class NonFiniteError(ValueError):
    """A non-finite input or result under ``nan_policy: raise``."""


@dataclass(frozen=True)
class BlockJob:
    """What every block of a job needs: small and picklable (the function is rebuilt per worker)."""

    config: JobConfig
    config_hash: str
    plan: Plan
    inputs: RandomRows | ArrayRows
    vectors: VectorSource
    store: str
    check: bool = False
    """Run the gradient checks on a few rows of every block (``submit --check``)."""
    blas_threads: int = 1
    """BLAS threads per worker thread (no oversubscription), set once per worker process."""
    sparse: SparseJacobian | None = None
    """A sparse Jacobian job's pattern and colouring: blocks store nonzeros."""
    reducer: Reducer | None = None
    """The job's reductions: each block stores its partials before its marker."""


CHECK_ROWS = 4
"""Rows of each block that ``submit --check`` checks."""


class CheckFailed(RuntimeError):
    """``submit --check``: the function failed a gradient check on this block's rows."""


@dataclass(frozen=True)
class BlockResult:
    i: int
    j: int
    rows: int
    products: int
    seconds: float
    nonfinite: dict[str, int]
    checks: dict[str, float] | None = None
    """check name -> relative error on this block's rows, when checked."""
    steps: dict[str, float] = field(default_factory=dict)
    """Seconds of each step (:data:`STEPS`) of this block on its worker."""
    refused: str | None = None
    """Why the store refused this block's write (a full disk, a read-only file system: see
    :func:`jacrun.errors.storage_refusal`): returned, not raised, so that Dask does not retry
    what no retry can fix. The block is not done (no marker)."""


STEPS = ("setup", "inputs", "kernel", "checks", "reduce", "write")
"""A block's steps: function build and limits (first block of a worker), reading or generating
x and the vectors, the kernel, finiteness and gradient checks, the reductions' partials, the
write and marker."""


def step_shares(seconds: dict[str, float]) -> str:
    """'kernel 79%, write 15%, ...': each step's share of the blocks' summed time, largest
    first, steps under 0.5% left out; '' when nothing was timed."""
    total = sum(seconds.values())
    if total <= 0:
        return ""
    shares = sorted(((value / total, step) for step, value in seconds.items()), reverse=True)
    return ", ".join(f"{step} {share:.0%}" for share, step in shares if share >= 0.005)


class Laps:
    """Seconds per step of one block, each lap charged to the step that just ended."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] += now - self._last
        self._last = now


def worker_function(job: BlockJob) -> Function:
    """The job's function, built once per worker process and config."""
    function = _FUNCTIONS.get(job.config_hash)
    if function is None:
        from jacrun.prepare import build

        _FUNCTIONS.clear()  # one job at a time per worker: free the last job's work buffers
        function = _FUNCTIONS[job.config_hash] = build(job.config, job.inputs)
    return function


def compute_block(
    job: BlockJob, function: Function, i: int, j: int, laps: Laps | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(x, y, result (rows, k, width)) of block (i, j), in the compute dtype; ``laps`` times
    the reading ("inputs") and the kernel. A sparse Jacobian's result is its nonzeros (rows, nnz),
    and its y is None when the job does not save it."""
    plan = job.plan
    a, b = plan.block_rows(i)
    k0, k1 = plan.block_vectors(j)
    x = job.inputs.read(a, b, function.dtype)
    vectors = None if job.sparse is not None else job.vectors.read(a, b, k0, k1, function.dtype)
    if laps is not None:
        laps.lap("inputs")
    y, result = block_kernel(function, plan.reverse, job.sparse, plan.save_outputs)(x, vectors)
    if laps is not None:
        laps.lap("kernel")
    return x, y, result


def hold(job: BlockJob) -> BlockJob:
    """The task whose result is the job every block needs: the scheduler recomputes it if the
    workers holding it leave (scattered data would be lost with them)."""
    return job


@floating_point_quiet
def run_block(job: BlockJob, i: int, j: int) -> BlockResult:
    """Compute and store block (i, j); idempotent (same bytes, same marker when run twice)."""
    from jacrun.location import register
    from jacrun.store import write_block

    start = time.perf_counter()
    laps = Laps()
    limit_blas(job.blas_threads)
    keep_freed_memory()
    function = worker_function(job)
    laps.lap("setup")
    checks = _check(job, function, i) if job.check and j == 0 else None
    laps.lap("checks")
    x, y, result = compute_block(job, function, i, j, laps)
    nonfinite = _finiteness(job, i, j, x, y, result)
    laps.lap("checks")
    rows = x.shape[0]
    k0, k1 = job.plan.block_vectors(j)
    del x  # its memory serves the write's encoded chunks
    partials = job.reducer.partials(result) if job.reducer is not None else None
    laps.lap("reduce")
    dtype = np.dtype(job.config.output_dtype)
    register(job.config.output.store, job.config.output.storage_options)  # a URL's options, here too
    refused = None
    try:
        write_block(
            job.store,
            job.plan,
            i,
            j,
            None if y is None else y.astype(dtype, copy=False),
            result.astype(dtype, copy=False),
            partials,
        )
    except OSError as exc:
        refused = storage_refusal(exc)
        if refused is None:
            raise
    laps.lap("write")
    return BlockResult(
        i,
        j,
        rows=0 if refused else rows,
        products=0 if refused else rows * (k1 - k0),
        seconds=time.perf_counter() - start,
        nonfinite={} if refused else nonfinite,
        checks=checks,
        steps=laps.seconds,
        refused=refused,
    )


async def flush_writes(store: str) -> list[tuple[str | None, str]]:
    """On a worker, when a run ends: wait (off the event loop) until its chunk files of
    ``store`` are on disk; (marker, what failed) for each write error found."""
    import asyncio

    from jacrun import writeback

    errors = await asyncio.to_thread(writeback.flush, Path(store))
    return [(str(error.marker) if error.marker else None, error.reason) for error in errors]


def _check(job: BlockJob, function: Function, i: int) -> dict[str, float] | None:
    """Gradient checks on the block's first rows; raise CheckFailed naming what failed."""
    from jacrun.checks import check

    a, b = job.plan.block_rows(i)
    rows = job.inputs.read(a, min(b, a + CHECK_ROWS), function.dtype)
    if rows.shape[0] < 2 or not np.isfinite(rows).all():
        return None
    report = check(function, rows)
    if job.sparse is not None:
        from jacrun.checks import check_sparse

        sparse_report = check_sparse(function, job.sparse, rows)
        report = replace(report, rows=report.rows + sparse_report.rows)
    failed = [f"{r.name} error {r.error:.3g} > {r.tolerance:.3g}" for r in report.rows if not r.passed]
    if failed:
        raise CheckFailed(f"gradient check failed on samples {a}:{a + rows.shape[0]}: " + "; ".join(failed))
    return {r.name: float(r.error) for r in report.rows}


def nonfinite_count(values: np.ndarray) -> int:
    """Non-finite values in ``values``. A sum is finite only if every term is (NaN and inf
    propagate), so the usual all-finite case costs one pass and no mask; a non-finite sum
    (or one that overflowed) falls back to counting."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(values, dtype=values.dtype)):
            return 0
    return values.size - int(np.count_nonzero(np.isfinite(values)))


def _finiteness(
    job: BlockJob, i: int, j: int, x: np.ndarray, y: np.ndarray | None, result: np.ndarray
) -> dict[str, int]:
    """Count non-finite values; under ``nan_policy: raise`` name the first bad sample instead."""
    a, _ = job.plan.block_rows(i)
    counts = {}
    for name, values in (("x", x), ("y", y), (job.plan.result_name, result)):
        if values is None:  # y of a sparse job that does not save it is not computed
            continue
        count = nonfinite_count(values)
        counts[name] = count
        if count and job.config.nan_policy == "raise":
            row = int(np.argwhere(~np.isfinite(values))[0][0]) + a
            what = "input" if name == "x" else "output" if name == "y" else "result"
            raise NonFiniteError(
                f"block ({i}, {j}): non-finite {what} ({name}) at sample {row} "
                f"({count} non-finite values in this block); set nan_policy: propagate to keep them"
            )
    return counts
