"""The sparse section's residuals, from ``examples/stencils/stencil_residuals.py`` (which the
tests share): ``bratu`` and the 9-point Allen-Cahn residual, as jacrun Functions (the built-in,
a NumPy ``Function`` subclass, ``autodiff: jax | torch`` adapters) and as plain JAX and torch
functions for asdex and the dense baselines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

STENCILS = Path(__file__).resolve().parents[2] / "examples" / "stencils"
LAM = 6.0
"""bratu's lambda."""
C = 1.0
"""The 9-point residual's reaction coefficient c."""

Residual = Literal["bratu", "9-point"]
RESIDUALS: tuple[Residual, ...] = ("bratu", "9-point")
_NAMES = {"bratu": "bratu", "9-point": "allen_cahn"}


def module() -> Any:
    """``stencil_residuals``, imported from the examples folder."""
    if str(STENCILS) not in sys.path:
        sys.path.insert(0, str(STENCILS))
    import stencil_residuals

    return stencil_residuals


def _params(residual: Residual, grid: int) -> dict[str, Any]:
    return {"grid": grid, "lam": LAM} if residual == "bratu" else {"grid": grid, "c": C}


def numpy_allen_cahn(grid: int):
    """The 9-point residual's NumPy ``Function`` subclass, built as ``kind: python`` builds it."""
    from jacrun.functions import build_function

    spec = {"kind": "python", "target": "stencil_residuals:AllenCahn9", "path": str(STENCILS)}
    return build_function({**spec, "params": _params("9-point", grid)})


def builtin_bratu(grid: int):
    from jacrun.functions import build_function

    return build_function({"kind": "bratu", **_params("bratu", grid)})


def adapter(residual: Residual, backend: str, grid: int):
    """The residual's JAX or torch function through ``autodiff: backend`` (per sample)."""
    from jacrun.functions import build_function

    return build_function(
        {
            "kind": "python",
            "autodiff": backend,
            "target": f"stencil_residuals:{_NAMES[residual]}_{backend}",
            "path": str(STENCILS),
            "params": _params(residual, grid),
        }
    )


def plain(residual: Residual, backend: str, grid: int):
    """The residual of one sample as a plain JAX or torch function."""
    return getattr(module(), f"{_NAMES[residual]}_{backend}")(**_params(residual, grid))
