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
only at writeback) belongs to a block that has usually written its marker already. That marker
file is deleted, so the block counts as not done and a rerun recomputes it, and the error is
kept: a block about to write its marker first asks :func:`failed` whether its own data failed,
and :func:`flush`, which the runner calls on every worker when a run ends, checks the files
still pending and reports the errors found, naming each file. An error for a file rewritten
since (a retry, a rerun) is dropped. A process that exits normally flushes too (atexit), so an
error found then still clears its block's marker; a process killed outright cannot. Without
``posix_fadvise`` (macOS, Windows) this module does nothing.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

MIN_BYTES = 1 << 20
"""Files smaller than this (metadata, markers, small chunks) are left to the kernel."""
LAG_BYTES = 64 << 20
"""Bytes written after a file before its pages are dropped: time for its writeback to finish."""

_WAIT_WRITE_WAIT = 7  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER: the file is on disk


@dataclass(frozen=True)
class WriteError:
    """A chunk file whose data did not reach the disk."""

    path: Path
    marker: Path | None
    """The marker file of the block the data belongs to."""
    code: int
    """The errno the disk reported."""
    reason: str
    """'writing PATH to disk failed: ...'"""
    version: tuple[int, int]
    """(inode, mtime in ns) of the file that failed: a rewritten file is another version."""
    cleared: bool
    """Whether the marker was deleted when the error was found (or there is none)."""

    @property
    def message(self) -> str:
        if self.marker is None:
            return self.reason
        if self.cleared:
            return f"{self.reason}; its block's marker {self.marker} was cleared, so a rerun recomputes it"
        return f"{self.reason}; its block's marker {self.marker} could not be cleared: delete it, then rerun"

    def current(self) -> bool:
        """Whether the failed version is still the file at ``path`` (not rewritten or deleted)."""
        try:
            stat = self.path.stat()
        except OSError:
            return False
        return (stat.st_ino, stat.st_mtime_ns) == self.version


MAX_ERRORS = 10_000
"""Write errors a process keeps for :func:`flush` (the oldest are dropped beyond this)."""
_state = threading.Condition()
"""Guards the four below; notified when a check ends."""
_pending: deque[tuple[Path, int, Path | None]] = deque()
"""(file, size, marker of its block) of the files not checked yet, oldest first."""
_pending_bytes = [0]
_checking: list[Path] = []
"""Files taken off ``_pending`` whose check (wait, drop) is under way in some thread."""
_errors: deque[WriteError] = deque(maxlen=MAX_ERRORS)
"""Write errors found by checks, until :func:`failed` or :func:`flush` takes them."""


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
    """``path`` (``size`` bytes) was just written: start its writeback, and check the files
    written at least :data:`LAG_BYTES` earlier (wait until on disk, drop their pages).
    ``marker``: the marker file of the block the data belongs to, deleted if the data turns
    out not to have reached the disk; the error is kept for :func:`flush`."""
    if not streams(size):
        return
    _advise_dontneed(path)  # dirty pages: starts their writeback, drops nothing yet
    with _state:
        _pending.append((path, size, marker))
        _pending_bytes[0] += size
        due = []
        while _pending and _pending_bytes[0] - _pending[0][1] >= LAG_BYTES:
            old, old_size, old_marker = _pending.popleft()
            _pending_bytes[0] -= old_size
            due.append((old, old_marker))
        _checking.extend(old for old, _ in due)
    _check(due)


def failed(marker: Path) -> WriteError | None:
    """A write error found for the current data of the block whose marker is ``marker``, taken
    off the list: that block must fail instead of writing its marker."""
    with _state:
        mine = _take_errors(lambda error: error.marker == marker)
    return next((error for error in mine if error.current()), None)


def flush(under: Path | None = None, timeout: float | None = None) -> list[WriteError]:
    """Check every pending file (``under`` a folder, if given), wait (up to ``timeout``
    seconds) for the checks other threads have under way there, and return the write errors
    found there, each for a file not rewritten since. Their markers are deleted once more: a
    block may have written its marker after its data was found bad."""

    def inside(path: Path) -> bool:
        return under is None or path.is_relative_to(under)

    with _state:
        due = [(path, marker) for path, _, marker in _pending if inside(path)]
        kept = [item for item in _pending if not inside(item[0])]
        _pending.clear()
        _pending.extend(kept)
        _pending_bytes[0] = sum(size for _, size, _ in kept)
        _checking.extend(path for path, _ in due)
    _check(due)
    with _state:
        _state.wait_for(lambda: not any(inside(path) for path in _checking), timeout)
        found = _take_errors(lambda error: inside(error.path))
    found = [error for error in found if error.current()]
    return [replace(error, cleared=_unmark(error.marker)) if error.marker else error for error in found]


def pending_bytes() -> int:
    """Bytes this process wrote whose pages it has not dropped yet."""
    return _pending_bytes[0]


def _take_errors(select: Callable[[WriteError], bool]) -> list[WriteError]:
    """Take the recorded errors ``select`` picks off the list (call holding ``_state``)."""
    taken = [error for error in _errors if select(error)]
    for error in taken:
        _errors.remove(error)
    return taken


def _check(due: list[tuple[Path, Path | None]]) -> None:
    """Wait for each file to be on disk and drop its pages, recording write errors."""
    for path, marker in due:
        error = None
        try:
            error = _drop(path, marker)
        finally:
            with _state:
                _checking.remove(path)
                if error is not None:
                    _errors.append(error)
                _state.notify_all()


EXIT_TIMEOUT = 60.0
"""Seconds a process waits, on exit, for checks under way in its other threads."""


@atexit.register
def _flush_at_exit() -> None:
    """A worker that exits normally (retired, restarted, its cluster closed) checks its last files."""
    for error in flush(timeout=EXIT_TIMEOUT):
        logging.getLogger("jacrun").error("%s", error.message)


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


def _drop(path: Path, marker: Path | None = None) -> WriteError | None:
    """Wait until ``path`` is on disk, then drop its pages; the write error found, if any,
    after deleting ``marker`` (its block is then not done)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # deleted or replaced since: nothing of it to wait for
    version = (0, 0)
    try:
        stat = os.fstat(fd)
        version = (stat.st_ino, stat.st_mtime_ns)
        _wait(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        reason = f"writing {path} to disk failed: {exc.strerror}"
        cleared = _unmark(marker) if marker is not None else True
        return WriteError(path, marker, exc.errno or errno.EIO, reason, version, cleared)
    finally:
        os.close(fd)
    return None


def _unmark(marker: Path) -> bool:
    """Delete a block's marker file (a missing chunk reads as 0: not done); whether it is gone."""
    try:
        marker.unlink(missing_ok=True)
    except OSError:
        return False
    return True


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
