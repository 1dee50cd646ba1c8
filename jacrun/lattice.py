"""Exact colourings of regular stencils: colour a . x mod q of each point x of the pattern's grid.

A stencil on a d-dimensional grid gives a conflict graph whose edges join grid points a few
steps apart. In flat (row-major) indices that is a handful of offsets. When the vertex count
factors into a grid shape (L0, ..., Ld-1) on which every offset is a short vector delta, the
linear colouring a . x mod q is proper wherever a . delta != 0 (mod q) for every delta:
(i + 2j) mod 5 for the 5-point stencil, (i + 2j + 3k) mod 7 for the 7-point one, (i + 3j) mod 9
and (i + 3j + 9k) mod 27 for the 9- and 27-point boxes. These reach the lower bound (the
nonzeros of one row conflict pairwise), where greedy orders use about 1.6x as many colours on
3-D grids.

The grid shape is a guess from the offsets: :func:`candidates` proposes colourings, and the
caller keeps one only after checking it against every edge of the conflict graph (edges that
wrap around a periodic boundary, or a pattern that is no stencil at all, fail that check).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MAX_OFFSETS = 512
"""More distinct offsets than this is no stencil: no lattice colouring is tried."""
RADIUS = 4
"""Longest step along one axis of a conflict offset (a radius-2 stencil conflicts at 4)."""
MAX_DIMS = 4
MAX_FORMS = 1 << 16
"""Linear forms a tried per (grid, q): all of Z_q^d while q^d fits, else none."""
FORM_CHUNK = 4096
MAX_VECTORS = 2
"""A grid whose edges show more distinct vectors (up to sign) than this many per neighbour of
a vertex (the largest degree) is no stencil's: a stencil repeats one set of vectors at every
point (half the degree, up to sign; a periodic grid's wrap-around edges add a few)."""
SEARCH_WORK = 16_000_000
"""Products a . delta (forms times vectors) at most, a quarter per grid (about 0.04 s each)."""
MAX_SHAPES = 256
"""Grid shapes whose edge vectors are counted (shortest flat-offset vectors first) on the
edges of about :data:`RANK_COLUMNS` columns; the best 2 :data:`MAX_GRIDS` are counted again
on all the edges read."""
RANK_COLUMNS = 256
MAX_GRIDS = 4
"""Grid shapes searched for a linear form, fewest distinct edge vectors first."""
AXES = "ijkl"


@dataclass(frozen=True)
class Lattice:
    """The colouring (a . x) mod q on a row-major grid of ``shape``."""

    shape: tuple[int, ...]
    form: tuple[int, ...]
    q: int

    def colours(self) -> np.ndarray:
        size = int(np.prod(self.shape))
        colours = np.zeros(size, dtype=np.int64)
        for axis, coordinate in enumerate(np.unravel_index(np.arange(size), self.shape)):
            if self.form[axis]:
                colours += self.form[axis] * coordinate
        return (colours % self.q).astype(np.int32)

    def __str__(self) -> str:
        terms = [f"{'' if a == 1 else a}{AXES[axis]}" for axis, a in enumerate(self.form) if a]
        grid = " x ".join(map(str, self.shape))
        return f"lattice ({' + '.join(terms)}) mod {self.q} on a {grid} grid"


def offsets(size: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distinct |flat offsets| v - u, taken mod ``size`` into [0, size/2] (on a periodic grid
    the wrap-around edges are short too), without 0."""
    flat = (v - u) % size
    flat = np.minimum(flat, size - flat)
    return np.unique(flat[flat > 0])


def steps(shape: tuple[int, ...], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distinct grid vectors x(v) - x(u) of the edges, one row each, on a row-major grid."""
    spans = tuple(2 * length - 1 for length in shape)  # a difference lies in (-length, length)
    diff = [
        a - b + length - 1
        for a, b, length in zip(np.unravel_index(v, shape), np.unravel_index(u, shape), shape, strict=True)
    ]
    codes = np.unique(np.ravel_multi_index(diff, spans))
    vectors = np.column_stack(np.unravel_index(codes, spans)) - (np.asarray(shape) - 1)
    return vectors[codes > np.ravel_multi_index(tuple(np.asarray(shape) - 1), spans)]  # one of +-delta


@lru_cache(maxsize=64)
def divisors(size: int) -> tuple[int, ...]:
    """The divisors of ``size`` from 2 up, in increasing order."""
    small = [d for d in range(2, int(size**0.5) + 1) if size % d == 0]
    return tuple(sorted({*small, *(size // d for d in small), size} - {1}))


def grids(flat: np.ndarray, size: int, dims: int) -> Iterator[tuple[tuple[int, ...], int]]:
    """Row-major grid shapes of ``dims`` axes and ``size`` points on which every flat offset is
    a short vector, with the sum of the vectors' lengths. The fastest axis's length L fixes each
    offset's step along it (its remainder mod L, balanced), the quotients the other axes'. A step
    longer than :data:`RADIUS` (or than the axis) rules the shape out, and so does an unused
    axis (merged with its neighbour, it explains the offsets as well)."""
    if dims == 1:
        longest = int(np.abs(flat).max())
        if 0 < longest <= min(RADIUS, size - 1):
            yield (size,), int(np.abs(flat).sum())
        return
    for length in divisors(size):
        if length * 2 ** (dims - 1) > size:
            break
        step = (flat + length // 2) % length - length // 2
        longest = int(np.abs(step).max())
        if longest == 0 or longest > min(RADIUS, length - 1):
            continue
        for shape, total in grids((flat - step) // length, size // length, dims - 1):
            yield (*shape, length), total + int(np.abs(step).sum())


def linear_form(vectors: np.ndarray, q: int) -> tuple[int, ...] | None:
    """The first a in Z_q^d (lexicographic) with a . delta != 0 (mod q) for every vector delta.
    Products in float64 (BLAS), exact for these small integers; in chunks, so a hit ends early."""
    dims = vectors.shape[1]
    if q**dims > MAX_FORMS:
        return None
    deltas = vectors.T.astype(np.float64)
    for first in range(0, q**dims, FORM_CHUNK):
        codes = np.arange(first, min(first + FORM_CHUNK, q**dims))
        forms = np.stack(np.unravel_index(codes, (q,) * dims), axis=1)
        hit = np.flatnonzero(((forms.astype(np.float64) @ deltas) % q != 0).all(axis=1))
        if hit.size:
            return tuple(int(a) for a in forms[hit[0]])
    return None


def candidates(size: int, u: np.ndarray, v: np.ndarray, lower: int, upper: int) -> Iterator[Lattice]:
    """Lattice colourings with at least ``lower`` and fewer than ``upper`` colours, each with
    the fewest colours on its grid, from the edges (u, v) of the conflict graph (both ways; a
    sample of them will do). Grid shapes on which the flat offsets are short vectors are ranked
    by the distinct edge vectors they see, fewest first (the true grid sees each stencil offset
    as one vector; a wrong one also splits offsets that carry into the next axis; counted on a
    few columns' edges, then on all for the best), then by the most axes (two axes merged
    without carries see as many vectors, and their forms are a special case of the unmerged
    grid's). A form must avoid 0 on every edge vector, a periodic grid's wrap-around edges
    included. Not checked on every edge: the caller does that."""
    flat = offsets(size, u, v)
    if flat.size == 0 or flat.size > MAX_OFFSETS:
        return
    shapes = sorted(
        ((total, dims, shape) for dims in range(1, MAX_DIMS + 1) for shape, total in grids(flat, size, dims)),
        key=lambda found: found[:2],
    )[:MAX_SHAPES]
    columns = np.unique(u)
    few = np.isin(u, columns[:: max(1, columns.size // RANK_COLUMNS)])
    shapes = sorted(shapes, key=lambda found: (len(steps(found[2], u[few], v[few])), -found[1]))
    counted = [(steps(shape, u, v), shape) for *_, shape in shapes[: 2 * MAX_GRIDS]]
    counted.sort(key=lambda found: (len(found[0]), -len(found[1])))
    degree = int(np.bincount(u).max())
    for vectors, shape in counted[:MAX_GRIDS]:
        if len(vectors) > MAX_VECTORS * degree:
            break
        work = 0
        for q in range(max(lower, 2), upper):
            work += min(q ** len(shape), MAX_FORMS) * len(vectors)
            if work > SEARCH_WORK // MAX_GRIDS:
                break
            form = linear_form(vectors, q)
            if form is not None:
                yield Lattice(shape, form, q)
                break
