"""Section ``adapters``: jacrun's autodiff adapters against each framework's own batched VJP.

The table of ``scripts/bench_adapters.py`` (which also runs on its own), on smaller shapes
with ``--quick``, for the frameworks this run compares against.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any

from jacrun_bench.common import Context, Target
from jacrun_bench.frameworks import usable

NAME = "adapters"
TITLE = "Autodiff adapters (scripts/bench_adapters.py)"
HELP = "skip scripts/bench_adapters.py"

SCRIPT = Path(__file__).resolve().parents[1] / "bench_adapters.py"


def measure(ctx: Context) -> str:
    """The markdown table, or why there is none."""
    frameworks = [name for name, version in ctx.frameworks.items() if usable(version)]
    if not SCRIPT.exists():
        return "scripts/bench_adapters.py is not present."
    if not frameworks:
        return "Skipped (no frameworks requested)."
    try:
        sys.path.insert(0, str(SCRIPT.parent))
        module = importlib.import_module(SCRIPT.stem)
        options: dict[str, Any] = {"repeats": 2, "sizes": (32, 64, 64, 8)} if ctx.quick else {}
        rows = module.bench_adapters(256 if ctx.quick else 4096, **options)
        rows = [r for r in rows if r.get("adapter") in frameworks]
        return module.markdown(rows) if rows else "No adapter ran (no framework installed)."
    except Exception as exc:  # noqa: BLE001 - report the failure in the report, run the rest
        return f"bench_adapters failed: {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(SCRIPT.parent))


def render(table: str, ctx: Context) -> str:
    return table


def targets(table: str) -> list[Target]:
    return []
