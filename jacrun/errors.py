"""Exceptions that separate a user's mistake (exit 2) from a job that failed (exit 1)."""

from __future__ import annotations

import errno


class JacrunError(Exception):
    """Base class of every error jacrun raises on purpose."""


class ConfigError(JacrunError):
    """Bad input: a config, file, shape or option the user can fix. The CLI exits 2."""


class JobFailed(JacrunError):
    """The job ran but did not complete every block. The CLI exits 1."""


REFUSING_STORAGE = {
    errno.ENOSPC: "the store's file system is full",
    errno.EDQUOT: "the store's disk quota is used up",
    errno.EROFS: "the store's file system is read-only",
    errno.EACCES: "the store may not be written by the workers",
    errno.EPERM: "the store may not be written by the workers",
}
"""Write errors that no retry can fix: the job stops at the first one (see :func:`storage_refusal`)."""


def storage_refusal(exc: BaseException) -> str | None:
    """'the store's file system is full (No space left on device: /path)' for a write error
    that rerunning the block cannot fix, else None."""
    if not isinstance(exc, OSError) or exc.errno not in REFUSING_STORAGE:
        return None
    detail = exc.strerror or str(exc)
    if exc.filename:
        detail = f"{detail}: {exc.filename}"
    return f"{REFUSING_STORAGE[exc.errno]} ({detail})"


class Terminated(KeyboardInterrupt):
    """SIGTERM during ``jacrun submit``, handled as Ctrl-C is: the run records what it did and
    cancels the batch jobs it submitted. The CLI exits 143."""
