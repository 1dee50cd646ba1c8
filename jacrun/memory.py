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
Without glibc (macOS, musl) this does nothing.

:func:`worker_environ` is the other half, for worker processes jacrun starts itself (a local
cluster, batch jobs): glibc reads its tunables only at process start, so they go in the
environment. ``glibc.malloc.hugetlb=1`` makes malloc ask for transparent huge pages on the
memory it maps, as NumPy already does for its own arrays of 4 MiB or more: the encoded chunks
that numcodecs allocates afresh for every block (24 MB a block for an MLP job) then fault in
2 MiB at a time instead of 4 KiB. Measured with zstd (``docs/performance.md``): the write of
an MLP block 9 ms shorter in one process, 4 ms (8%) on the 2 GB job's workers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20
"""Arrays below this come from the reusable heap."""
TRIM_THRESHOLD = 64 << 20
"""Freed heap kept mapped for the next block."""

HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"
"""glibc tunable (2.35 and later; older versions ignore it): malloc madvises its mappings for
transparent huge pages. A no-op where they are off."""

_APPLIED: list[bool] = []


def worker_environ(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment variables for the worker processes jacrun starts, set before they start.

    ``GLIBC_TUNABLES`` gets :data:`HUGE_PAGE_MALLOC`, unless ``environ`` (the user's) already
    sets it: their tunables are kept as they are. Empty off Linux.
    """
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in environ:
        return {}
    return {"GLIBC_TUNABLES": HUGE_PAGE_MALLOC}


def keep_freed_memory() -> bool:
    """Apply the thresholds (once per process); True if malloc took them."""
    if not _APPLIED:
        mallopt = _mallopt()
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
