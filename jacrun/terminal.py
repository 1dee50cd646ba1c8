"""What the ``jacrun`` command lets reach the terminal from Python's warnings.

Every line a user sees should be jacrun's own or an error they can act on. Warnings that
libraries (Dask, Zarr, numcodecs, xarray, ...) raise about their own internals, deprecation
notices meant for developers, and NumPy's floating-point warnings (jacrun reports non-finite
values itself: ``nan_policy``, the checks' errors) are dropped; any other warning, from jacrun
or from a user's function, prints as one line without a file path or source line.
:func:`install` is called by the CLI only (library users keep Python's warnings as they
configured them); every block runs under :func:`floating_point_quiet`, on any cluster.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

LIBRARIES = ("distributed", "dask", "zarr", "numcodecs", "xarray", "tornado", "bokeh", "fsspec", "pandas")
"""Packages whose own warnings are about their internals as jacrun uses them, not the user's job."""

FLOATING_POINT = r"(overflow|underflow|invalid value|divide by zero) encountered"
"""NumPy's floating-point RuntimeWarnings: the non-finite values are counted and reported by jacrun."""

DEVELOPER_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def install(say: Callable[[str], None]) -> None:
    """Filter this process's warnings as the module docstring says; ``say`` prints a line."""
    for category in DEVELOPER_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    for package in LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{package}(\..*)?$")
    warnings.filterwarnings("ignore", message=FLOATING_POINT, category=RuntimeWarning)

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if category.__module__.partition(".")[0] in LIBRARIES:
            return  # a library's own category, raised with a stacklevel that points at jacrun
        text = " ".join(str(message).split())
        say(f"{text} ({category.__name__})")

    warnings.showwarning = show


def floating_point_quiet(run: F) -> F:
    """``run`` without NumPy's floating-point warnings: on a worker they would reach the terminal
    of a local cluster with file and source line, while ``nan_policy`` already reports the
    non-finite values. ``np.errstate`` is per thread, so worker threads do not interfere."""

    @functools.wraps(run)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return run(*args, **kwargs)

    return quiet  # type: ignore[return-value]
