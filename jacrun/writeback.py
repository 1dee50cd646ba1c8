"""Write-behind for result chunks: stream them to disk instead of piling them up in the page cache.

A job writes gigabytes that nobody reads back soon. Left to the kernel, every chunk stays in
the page cache as dirty pages until the background flusher starts (10% of RAM by default), so
each write takes fresh pages from the free list. On virtual machines that hand free memory back
to the host (free page reporting, ballooning), a fresh page costs a fault into the hypervisor:
on this project's VM a 25 MB chunk took 5 ms to write while the cache was warm and 58 ms once
it was not, and the second worker's kernel slowed down with it.

:func:`written` is called after each large chunk file is written. It starts that file's
writeback at once (``sync_file_range``, which does not wait) and, once more than
:data:`LAG_BYTES` have been written since an older file, waits for that older file to be on disk
(by then it nearly always is) and drops its pages (``posix_fadvise(DONTNEED)``). Each process
then keeps at most about :data:`LAG_BYTES` of its results in the page cache, reuses the pages it
just freed, and writes steadily at disk speed. The data and the "marker after data" order are
unchanged. Without ``sync_file_range`` and ``posix_fadvise`` (macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections import deque
from pathlib import Path

MIN_BYTES = 1 << 20
"""Files smaller than this (metadata, markers, small chunks) are left to the kernel."""
LAG_BYTES = 64 << 20
"""Bytes written after a file before its pages are dropped: time for its writeback to finish."""

_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait
_WAIT_WRITE_WAIT = 7  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER: the file is on disk

_lock = threading.Lock()
_pending: deque[tuple[Path, int]] = deque()
_pending_bytes = [0]


def _sync_file_range():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
SUPPORTED = _SYNC_FILE_RANGE is not None
"""Whether this platform streams writes (Linux); elsewhere :func:`written` does nothing."""


def written(path: Path, size: int) -> None:
    """``path`` (``size`` bytes) was just written: start its writeback, drop files written long enough ago."""
    if not SUPPORTED or size < MIN_BYTES:
        return
    _sync(path, _WRITE)
    with _lock:
        _pending.append((path, size))
        _pending_bytes[0] += size
        due = []
        while _pending and _pending_bytes[0] - _pending[0][1] >= LAG_BYTES:
            old, old_size = _pending.popleft()
            _pending_bytes[0] -= old_size
            due.append(old)
    for old in due:
        _drop(old)


def pending_bytes() -> int:
    """Bytes this process wrote whose pages it has not dropped yet."""
    return _pending_bytes[0]


def _sync(path: Path, flags: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # replaced or deleted since (a rerun, --overwrite): nothing to stream
    try:
        _SYNC_FILE_RANGE(fd, 0, 0, flags)  # type: ignore[misc]
    finally:
        os.close(fd)


def _drop(path: Path) -> None:
    """Wait until ``path`` is on disk, then drop its pages from the page cache."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _SYNC_FILE_RANGE(fd, 0, 0, _WAIT_WRITE_WAIT)  # type: ignore[misc]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
