"""Write-behind for result chunks: stream them to disk instead of piling them up in the page cache.

A job writes gigabytes that nobody reads back soon. Left to the kernel, every chunk stays in
the page cache as dirty pages until the background flusher starts (10% of RAM by default), so
each write takes fresh pages from the free list. On virtual machines that hand free memory back
to the host (free page reporting, ballooning), a fresh page costs a fault into the hypervisor:
on this project's VM a 25 MB chunk took 5 ms to write while the cache was warm and 58 ms once
it was not, and the second worker's kernel slowed down with it.

:func:`written` is called after each large chunk file is written. It starts that file's
writeback at once (``posix_fadvise(DONTNEED)`` on dirty pages starts writing them and drops
nothing yet). Once at least :data:`LAG_BYTES` have been written after an older file, it waits
for that file to be on disk (by then it nearly always is) and drops its pages. Each process
then keeps about :data:`LAG_BYTES` (plus the chunk in hand) of its results in the page cache,
reuses the pages it just freed, and writes steadily at disk speed. The data and the "marker
after data" order are unchanged.

The wait is ``sync_file_range``, which waits for the data without forcing a journal commit
(1.8 ms a file here, against 7.6 ms for ``fdatasync``); where it is missing or refused, it is
``fdatasync``. On overlayfs (Docker's default) ``sync_file_range`` does nothing: pages are then
dropped once the writeback started at write time has finished.

A write error the wait reports (EIO; ENOSPC or EDQUOT on network filesystems, which report them
at writeback) belongs to a block that already wrote its marker. That marker file is deleted, so
the block counts as not done and a rerun recomputes it, and the error is raised naming the file,
so the block that finds it fails instead of the error being lost. :func:`flush`, called on every
worker when a run ends, does the same for the files still pending. Without ``posix_fadvise``
(macOS, Windows) this module does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
import threading
from collections import deque
from pathlib import Path

MIN_BYTES = 1 << 20
"""Files smaller than this (metadata, markers, small chunks) are left to the kernel."""
LAG_BYTES = 64 << 20
"""Bytes written after a file before its pages are dropped: time for its writeback to finish."""

_WAIT_WRITE_WAIT = 7  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER: the file is on disk

_lock = threading.Lock()
_pending: deque[tuple[Path, int, Path | None]] = deque()
"""(file, size, marker of the block it belongs to) of the files whose pages are not dropped yet."""
_pending_bytes = [0]


def _sync_file_range():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = [_sync_file_range()]
"""The wait (None: use fdatasync), in a list so that a refusal turns it off for the process."""
SUPPORTED = sys.platform.startswith("linux") and hasattr(os, "posix_fadvise")
"""Whether this platform streams writes (Linux); elsewhere :func:`written` does nothing."""


def streams(size: int) -> bool:
    """Whether a file of ``size`` bytes is streamed (Linux, at least :data:`MIN_BYTES`)."""
    return SUPPORTED and size >= MIN_BYTES


def written(path: Path, size: int, marker: Path | None = None) -> None:
    """``path`` (``size`` bytes) was just written: start its writeback, and drop the files
    written at least :data:`LAG_BYTES` earlier. ``marker``: the marker file of the block the
    data belongs to, deleted if the data turns out not to have reached the disk. OSError if the
    wait for one of the due files reports a write error (after every due file has been handled)."""
    if not streams(size):
        return
    _advise_dontneed(path)  # dirty pages: starts their writeback, drops nothing yet
    with _lock:
        _pending.append((path, size, marker))
        _pending_bytes[0] += size
        due = []
        while _pending and _pending_bytes[0] - _pending[0][1] >= LAG_BYTES:
            old, old_size, old_marker = _pending.popleft()
            _pending_bytes[0] -= old_size
            due.append((old, old_marker))
    errors = [error for error in (_drop(old, old_marker) for old, old_marker in due) if error is not None]
    if errors:
        raise errors[0]


def flush(under: Path | None = None) -> list[tuple[Path | None, str]]:
    """Wait for every pending file (``under`` a folder, if given) to be on disk and drop its
    pages: (marker, message) for each write error found, its marker deleted as in :func:`written`."""
    with _lock:
        due = [item for item in _pending if under is None or item[0].is_relative_to(under)]
        for item in due:
            _pending.remove(item)
            _pending_bytes[0] -= item[1]
    errors = ((marker, _drop(path, marker)) for path, _, marker in due)
    return [(marker, error.strerror or str(error)) for marker, error in errors if error is not None]


def pending_bytes() -> int:
    """Bytes this process wrote whose pages it has not dropped yet."""
    return _pending_bytes[0]


def _advise_dontneed(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # replaced or deleted since (a rerun, --overwrite): nothing to stream
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # a filesystem without page-cache advice: the kernel writes it back in its own time
    finally:
        os.close(fd)


def _drop(path: Path, marker: Path | None = None) -> OSError | None:
    """Wait until ``path`` is on disk, then drop its pages; the write error found, if any,
    after deleting ``marker`` (its block is then not done)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # deleted or replaced since: nothing of it to wait for
    try:
        _wait(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        message = f"writing {path} to disk failed: {exc.strerror}"
        if marker is not None:
            message += f"; {_unmark(marker)}"
        return OSError(exc.errno, message)
    finally:
        os.close(fd)
    return None


def _unmark(marker: Path) -> str:
    """Delete a block's marker file (a missing chunk reads as 0: not done); what happened, in words."""
    try:
        marker.unlink(missing_ok=True)
    except OSError as exc:
        return f"its block's marker {marker} could not be cleared ({exc.strerror}): delete it, then rerun"
    return f"its block's marker {marker} was cleared, so rerunning the job recomputes it"


def _wait(fd: int) -> None:
    """Return once the file's data is on disk; OSError for a write error."""
    function = _SYNC_FILE_RANGE[0]
    if function is not None:
        if function(fd, 0, 0, _WAIT_WRITE_WAIT) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code))
        _SYNC_FILE_RANGE[0] = None  # refused here (a sandbox, an odd filesystem): fdatasync from now on
    os.fdatasync(fd)
