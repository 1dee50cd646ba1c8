"""Exceptions that separate a user's mistake (exit 2) from a job that failed (exit 1)."""

from __future__ import annotations


class JacrunError(Exception):
    """Base class of every error jacrun raises on purpose."""


class ConfigError(JacrunError):
    """Bad input: a config, file, shape or option the user can fix. The CLI exits 2."""


class JobFailed(JacrunError):
    """The job ran but did not complete every block. The CLI exits 1."""
