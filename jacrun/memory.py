"""Let a worker reuse its freed small and medium arrays, instead of faulting fresh pages in.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any glibc malloc
tunable turns off glibc's adaptive mmap threshold, so on a worker every array over 128 KiB
(each 1 MiB random tile, each small chunk buffer) is a fresh ``mmap`` whose pages fault in on
first touch and go back to the OS on ``free``, block after block.

:func:`keep_freed_memory` sets, in the running process, the mmap threshold to 4 MiB (NumPy's own
huge-page threshold: larger arrays still get their own, huge-page-backed mappings) and lets malloc
keep up to 64 MiB of freed heap. Measured on an MLP vjp job (``docs/performance.md``): 4-7%
more samples/s at the same peak memory. Raising the threshold to 32 MiB gained 16-18%, but the
heap then fragments and a worker's peak grew by about 40%, beyond the plan's projection.
Without glibc (macOS, musl) this does nothing; a worker whose environment sets glibc's own
``MALLOC_MMAP_THRESHOLD_`` keeps that choice instead (:data:`OVERRIDE`).

Settings jacrun imposes on its workers, with their measured gains: docs/performance.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20
"""Arrays below this come from the reusable heap."""
TRIM_THRESHOLD = 64 << 20
"""Freed heap kept mapped for the next block."""

OVERRIDE = "MALLOC_MMAP_THRESHOLD_"
"""glibc's own variable for the mmap threshold: where a worker's environment sets it, malloc is
left as glibc set it from the environment (the way to turn these thresholds off)."""

_APPLIED: list[bool] = []


def keep_freed_memory() -> bool:
    """Apply the thresholds (once per process); True if malloc took them, False where there is
    no glibc or the environment sets :data:`OVERRIDE`."""
    if not _APPLIED:
        mallopt = None if OVERRIDE in os.environ else _mallopt()
        ok = mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        ok = ok and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))  # type: ignore[misc]
        _APPLIED.append(ok)
    return _APPLIED[0]


def _mallopt():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
