"""Row-parallel kernels: split a batch over as many threads as BLAS may use, 1 BLAS thread each.

A kernel alternates large GEMMs with elementwise steps (bias, activation, derivative). With one
kernel thread and a multi-threaded BLAS, the GEMMs use every core but NumPy's elementwise steps
use one while the other cores wait. Running contiguous row ranges of the batch on T threads, each
calling a single-threaded BLAS, keeps every core busy in both: NumPy releases the GIL in
``matmul`` and in ufuncs, and each thread has its own work buffers (see ``Workspace``).

T is the thread count BLAS has right now (threadpoolctl), so the budget the runner sets per
worker (worker threads x BLAS threads <= cores) also bounds the kernel: T threads x 1 BLAS thread.
A worker with one BLAS thread, the default on a LocalCluster, runs kernels exactly as before.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _forget_pool() -> None:
    """A forked child has none of the parent's pool threads: start a new pool when needed."""
    _STATE.pop("pool", None)
    _STATE.pop("pool_threads", None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _blas():  # noqa: ANN202 - threadpoolctl's controller of the loaded BLAS libraries
    blas = _STATE.get("blas")
    if blas is None:
        from threadpoolctl import ThreadpoolController

        blas = _STATE["blas"] = ThreadpoolController().select(user_api="blas")
    return blas


def kernel_threads() -> int:
    """Threads a kernel may use: the BLAS thread count now in force (at least 1). With several
    BLAS libraries loaded (torch may bring its own), the smallest count: never more threads
    than the budget the runner set on NumPy's."""
    libs = _blas().lib_controllers
    return max(1, min((lib.num_threads or 1 for lib in libs), default=1))


def _pool(threads: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _STATE.get("pool")
        if pool is None or _STATE.get("pool_threads") != threads:
            if pool is not None:
                pool.shutdown(wait=False)  # type: ignore[attr-defined]
            pool = _STATE["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="jacrun-kernel")
            _STATE["pool_threads"] = threads
        return pool  # type: ignore[return-value]


def blas_limit(threads: int):  # noqa: ANN201 - a context manager
    """BLAS limited to ``threads`` inside the block (and so are the kernel threads)."""
    return _blas().limit(limits=threads)


def one_blas_thread():  # noqa: ANN201 - a context manager
    """BLAS limited to one thread inside the block. For the small products a kernel computes
    before :func:`for_row_ranges`: a multi-threaded BLAS call leaves its worker threads
    spinning (OpenBLAS: up to ~0.1 s), and they would steal a core from the kernel threads."""
    return blas_limit(1)


def split(batch: int, rows: int, min_rows: int = 1) -> tuple[int, int]:
    """(threads, span) for a batch a kernel would run in ranges of ``rows`` rows on one thread:
    T = :func:`kernel_threads`, but no more than the ranges of ``min_rows`` the batch holds,
    each running ranges of ``ceil(min(rows, batch) / T)`` rows (never under ``min_rows``), so
    T threads hold about the work memory of one ``rows`` range. One thread: ``min(rows, batch)``."""
    threads = max(1, min(kernel_threads(), batch // max(min_rows, 1)))
    if threads == 1:
        return 1, max(1, min(rows, batch))
    return threads, max(min_rows, math.ceil(min(rows, batch) / threads))


def for_row_ranges(batch: int, threads: int, span: int, body: Callable[[int, int, int], None]) -> None:
    """Call ``body(start, stop, slot)`` over [0, batch) in ranges of ``span`` rows, with the
    (threads, span) of :func:`split`.

    Kernel thread ``slot`` (0 .. threads-1) runs ranges slot, slot + threads, ... one after the
    other, so a body may use the work buffers of its slot, fetched before the call. With more
    than one thread the slots run on a pool with BLAS limited to one thread; otherwise here.
    ``body`` must write disjoint rows.
    """
    ranges = [(start, min(start + span, batch)) for start in range(0, batch, span)]
    if threads == 1:
        for start, stop in ranges:
            body(start, stop, 0)
        return

    def run_slot(slot: int) -> None:
        for start, stop in ranges[slot::threads]:
            body(start, stop, slot)

    pool = _pool(threads)
    with one_blas_thread():
        futures = [pool.submit(run_slot, slot) for slot in range(threads)]
        errors = [future.exception() for future in futures]  # waits for every slot
    for error in errors:
        if error is not None:
            raise error
