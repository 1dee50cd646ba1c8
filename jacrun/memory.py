"""Keep a worker's freed block memory for its next block, instead of handing it back to the OS.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any glibc malloc
tunable turns off glibc's adaptive mmap threshold, so every NumPy array over 128 KiB (each random
tile, each input, result and compressed chunk of a block) becomes a fresh ``mmap`` whose pages
fault in on first touch and go back to the OS on ``free``. On a worker that made blocks of an
MLP vjp job about 12% slower than the same code in a plain process (``docs/performance.md``).

:func:`keep_freed_memory` raises both thresholds in the running process with ``mallopt``: arrays
up to 32 MiB come from the heap, and up to ``keep`` bytes of freed heap stay mapped. Peak memory
is unchanged (a block needs that memory anyway); between blocks the worker holds on to about
one block's worth. Without glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20
"""glibc refuses a larger mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)."""

INT_MAX = (1 << 31) - 1

_KEPT: list[int] = []


def keep_freed_memory(keep: int) -> bool:
    """Let malloc keep up to ``keep`` bytes of freed memory (once per value); True if applied."""
    keep = min(max(keep, 0), INT_MAX)
    if [keep] == _KEPT:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, keep))
    if ok:
        _KEPT[:] = [keep]
    return ok


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
