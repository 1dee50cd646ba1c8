"""The registry of the benchmark's sections, and what a section module provides.

A section is a module of this package; :data:`SECTIONS` lists them by module name, in the
order they run and appear in the report (a later section may read an earlier one's result
from ``ctx.results``). Each gets a ``--skip-NAME`` flag. See the package docstring for how to
add one.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from jacrun_bench.common import Context, Target

SECTIONS: tuple[str, ...] = ("kernels", "e2e", "memory", "sparse", "fd", "reduce", "s3", "adapters")
"""Section modules, in the order they run."""


class Section(Protocol):
    """What a section module defines."""

    NAME: str
    """Its key in ``ctx.results`` and its flag, ``--skip-NAME``."""
    TITLE: str
    """Its heading in the report."""
    HELP: str
    """The help of ``--skip-NAME``."""

    def measure(self, ctx: Context) -> Any:
        """Run the measurements; the result goes to ``render`` and ``targets``."""

    def render(self, result: Any, ctx: Context) -> str:
        """The section's markdown, below its heading."""

    def targets(self, result: Any) -> list[Target]:
        """Its rows of the targets table (none: [])."""


def sections() -> list[Section]:
    """The section modules, in order."""
    return [importlib.import_module(f"jacrun_bench.{name}") for name in SECTIONS]  # type: ignore[misc]
