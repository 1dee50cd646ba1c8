"""The sparse section's colourings: jacrun's colours and seconds against asdex's and the optimum.

Each colour is one product per sample, so colours are speed. Patterns: the stencils whose
optimum is known (a stencil's points conflict pairwise, and a lattice colouring reaches that
bound): the 5- and 9-point stencils in 2-D and the 7- and 27-point ones in 3-D, zero boundary;
and random patterns, where only the longest row bounds the optimum from below. Columns are
coloured (forward mode), as asdex's ``color_cols``; asdex's seconds include building its
pattern from COO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import reduce

import numpy as np
import scipy.sparse as sp

STENCILS = (
    ("5-point", "star", 2, 5),
    ("9-point", "box", 2, 9),
    ("7-point", "star", 3, 7),
    ("27-point", "box", 3, 27),
)
GRIDS = {2: (64, 256), 3: (16, 40)}
QUICK_GRIDS = {2: (8,), 3: (6,)}
RANDOM = (((2_000, 2_000), 0.003), ((20_000, 20_000), 0.0005))
QUICK_RANDOM = (((200, 150), 0.03),)


def band(size: int, periodic: bool = False) -> sp.csr_array:
    """The pattern of a 1-D 3-point stencil: tridiagonal, with the corners when periodic."""
    matrix = sp.diags_array([1, 1, 1], offsets=[-1, 0, 1], shape=(size, size), dtype=bool).tolil()
    if periodic:
        matrix[0, size - 1] = matrix[size - 1, 0] = True
    return sp.csr_array(matrix)


def stencil_pattern(kind: str, dims: int, grid: int, periodic: bool = False) -> sp.csr_array:
    """J's pattern of a residual on a grid^dims grid (row-major): ``star`` (the 5-point stencil
    in 2-D, 7-point in 3-D) or ``box`` (9- and 27-point), zero or periodic boundary."""
    one = band(grid, periodic)
    eye = sp.eye_array(grid, dtype=bool, format="csr")
    if kind == "box":
        matrix = reduce(sp.kron, [one] * dims)
    else:
        terms = [reduce(sp.kron, [one if axis == k else eye for axis in range(dims)]) for k in range(dims)]
        matrix = reduce(lambda a, b: a + b, terms)
    return sp.csr_array(matrix, dtype=bool)


def random_pattern(seed: int, shape: tuple[int, int], density: float) -> sp.csr_array:
    """A seeded random pattern of about ``density`` of its entries."""
    return sp.csr_array(sp.random_array(shape, density=density, rng=np.random.default_rng(seed)), dtype=bool)


@dataclass
class ColouringRow:
    pattern: str
    n: int
    lower_bound: int
    optimal: bool
    """``lower_bound`` is the optimum (a stencil), not only a bound."""
    colours: int
    seconds: float
    method: str
    their_colours: int | None
    their_seconds: float | None


def asdex_colours(pattern: sp.csr_array) -> tuple[int, float] | None:
    """asdex's column colours of ``pattern`` and its seconds (None without asdex)."""
    try:
        import asdex
    except ImportError:
        return None
    coo = pattern.tocoo()
    start = time.perf_counter()
    theirs = asdex.SparsityPattern.from_coo(coo.row.astype(np.int32), coo.col.astype(np.int32), pattern.shape)
    count = int(asdex.color_cols(theirs)[1])
    return count, time.perf_counter() - start


def measure(quick: bool, asdex: bool = True) -> list[ColouringRow]:
    """Every pattern's row; asdex's columns only with ``asdex`` (it imports JAX)."""
    from jacrun.sparsity import colour

    cases: list[tuple[str, sp.csr_array, bool]] = []
    for name, kind, dims, _ in STENCILS:
        for grid in (QUICK_GRIDS if quick else GRIDS)[dims]:
            label = f"{name} {' x '.join([str(grid)] * dims)}"
            cases.append((label, stencil_pattern(kind, dims, grid), True))
    for seed, (shape, density) in enumerate(QUICK_RANDOM if quick else RANDOM):
        cases.append(
            (
                f"random {shape[0]:,} x {shape[1]:,}, {density:.2%}",
                random_pattern(seed, shape, density),
                False,
            )
        )
    rows = []
    for label, pattern, exact in cases:
        ours = colour(pattern, "fwd")
        theirs = asdex_colours(pattern) if asdex else None
        rows.append(
            ColouringRow(
                label,
                int(pattern.shape[1]),
                ours.lower_bound,
                exact,
                ours.count,
                ours.seconds,
                ours.method,
                None if theirs is None else theirs[0],
                None if theirs is None else theirs[1],
            )
        )
    return rows


def table(rows: list[ColouringRow]) -> str:
    lines = [
        "| pattern | n | optimum | jacrun colours | jacrun s | asdex colours | asdex s | "
        "how jacrun coloured it |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        bound = str(row.lower_bound) if row.optimal else f">= {row.lower_bound}"
        theirs = "-" if row.their_colours is None else str(row.their_colours)
        their_seconds = "-" if row.their_seconds is None else f"{row.their_seconds:.2f}"
        lines.append(
            f"| {row.pattern} | {row.n:,} | {bound} | {row.colours} | {row.seconds:.2f} | {theirs} | "
            f"{their_seconds} | {row.method} |"
        )
    return "\n".join(lines)
