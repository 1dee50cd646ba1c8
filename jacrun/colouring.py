"""Colouring the columns of a sparse matrix with few colours, within a fixed amount of work.

Columns of one colour must not share a row: they are the vertices of the *conflict graph*,
joined when they share one. Each colour of a sparse Jacobian costs one product per sample, so
fewer colours are worth some search; the colouring runs once per job, before any cluster
starts, so the search has a budget. :func:`colour_columns` tries in turn, and stops as soon as
a colouring reaches the lower bound (the longest row: its columns conflict pairwise):

1. A lattice colouring (:mod:`jacrun.lattice`) when the columns are the points of a grid and
   the conflicts a stencil's: optimal on 5-, 7-, 9- and 27-point stencils in 2-D and 3-D. It
   reads the conflicts of a sample of columns only, so a stencil never builds the whole graph.
2. Greedy colourings in several vertex orders (smallest-last, largest-first, natural) and
   DSATUR, Python loops, while their edge visits fit :data:`SEQUENTIAL_WORK`; on a graph too
   large for any of them, a greedy colouring in randomised largest-first order, computed in
   vectorised rounds (Jones-Plassmann). The fewest colours so far are kept.
3. Iterated greedy (Culberson): greedy again with the vertices ordered colour class by colour
   class (classes reversed, largest first, or shuffled), which never needs more colours and
   sometimes fewer. A class is an independent set, so a whole class is recoloured at once
   (NumPy). It stops after :data:`PATIENCE` rounds without a gain or :data:`ITERATED_WORK`
   edge visits.

The budgets count work, not seconds, and random choices come from a fixed seed, so a pattern
always gets the same colours: a store's colouring can be recomputed. The result is checked
against every row before it is used (:func:`is_proper`).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from jacrun.lattice import candidates

SEQUENTIAL_WORK = 8_000_000
"""Edge visits of the Python greedy loops (about 0.4 us each, about 3 s in all): DSATUR and
smallest-last on conflict graphs up to 2 million edges, the cheaper orders up to 8 million."""
ITERATED_WORK = 60_000_000
"""Edge visits of iterated greedy (vectorised, about 16 ns each)."""
PATIENCE = 50
"""Rounds of iterated greedy without fewer colours before it stops."""
SEED = 0
SAMPLE = 4096
"""Columns whose conflicts the lattice search reads (all of them, up to this many)."""


@dataclass(frozen=True)
class Colouring:
    """Colours of the vertices, how they were found, the lower bound and the seconds it took."""

    colours: np.ndarray
    method: str
    lower_bound: int
    seconds: float

    @property
    def count(self) -> int:
        return count(self.colours)

    @property
    def optimal(self) -> bool:
        """No colouring has fewer colours: the count is the lower bound."""
        return self.count <= self.lower_bound


def count(colours: np.ndarray) -> int:
    return int(colours.max(initial=-1)) + 1


def column_conflicts(lines: sp.csr_array) -> sp.csr_array:
    """Columns of ``lines`` joined when they share a row: they need distinct colours."""
    lines = sp.csr_array(lines, dtype=np.int32)
    graph = sp.csr_array(lines.T @ lines)
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph


def is_proper(lines: sp.csr_array, colours: np.ndarray) -> bool:
    """No row of ``lines`` holds two columns of one colour."""
    rows = np.repeat(np.arange(lines.shape[0], dtype=np.int64), np.diff(lines.indptr))
    keys = rows * max(count(colours), 1) + colours[lines.indices]
    if keys.size == 0:
        return True
    if lines.shape[0] * max(count(colours), 1) <= 4 * keys.size + (1 << 20):
        return int(np.bincount(keys).max()) <= 1
    return not np.any(np.diff(np.sort(keys)) == 0)


def sample_conflicts(lines: sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """Edges (u, v) of the conflict graph of ``lines`` (both directions): those of every column
    or, of many, of :data:`SAMPLE` columns spread over them (a golden-ratio stride, in step
    with no grid)."""
    size = lines.shape[1]
    columns = np.arange(size, dtype=np.int64)
    if size > SAMPLE:
        columns = np.unique(np.arange(SAMPLE, dtype=np.int64) * int(size * 0.6180339887) % size)
    near = sp.csr_array(sp.csr_array(lines.T)[columns] @ sp.csr_array(lines, dtype=np.int32))
    u = np.repeat(columns, np.diff(near.indptr))
    v = near.indices.astype(np.int64)
    return u[u != v], v[u != v]


def colour_columns(lines: sp.csr_array, lower_bound: int = 1) -> Colouring:
    """A colouring of the columns of ``lines`` with few colours, no two of one colour in a row
    (``lower_bound``: what no colouring can beat); see the module docstring for the search.
    A lattice colouring at the bound needs only a sample of the conflict graph; anything else
    builds all of it."""
    start = time.perf_counter()
    lines = sp.csr_array(lines)
    size = lines.shape[1]
    lower = max(lower_bound, min(size, 1))
    best, method = None, ""
    if lower >= size:
        best, method = np.arange(size, dtype=np.int32), "one colour each"
    else:
        u, v = sample_conflicts(lines)
        upper = int(np.bincount(u, minlength=size).max(initial=0)) + 2  # greedy needs max degree + 1
        for lattice in candidates(size, u, v, lower, upper):
            colours = consecutive(lattice.colours())
            if (best is None or count(colours) < count(best)) and is_proper(lines, colours):
                best, method = colours, str(lattice)
                if count(best) <= lower:
                    break
    if best is None or count(best) > lower:
        graph = column_conflicts(lines)
        if graph.nnz == 0:
            best, method = np.zeros(size, dtype=np.int32), "no conflicts"
        else:
            best, method = _greedy_colourings(graph, lower, best, method)
            start_count = count(best)
            best, rounds = iterated_greedy(graph, best, lower)
            if rounds:
                method += f" ({start_count} colours), then {rounds} rounds of iterated greedy"
        if not is_proper(lines, best):  # pragma: no cover - a bug, never a user's error
            raise RuntimeError(f"colouring by {method} is not proper")
    return Colouring(best, method, lower, time.perf_counter() - start)


def consecutive(colours: np.ndarray) -> np.ndarray:
    """The colours renumbered 0..C-1 in order, leaving out unused ones."""
    return np.unique(colours, return_inverse=True)[1].astype(np.int32).reshape(colours.shape)


# ---- greedy colourings ---------------------------------------------------------------------


def _greedy_colourings(
    graph: sp.csr_array, lower: int, best: np.ndarray | None, method: str
) -> tuple[np.ndarray, str]:
    """The fewest colours of ``best`` and the sequential greedy colourings that fit the work
    budget (ties: the earlier); the parallel greedy one when none fits and ``best`` is None."""
    orders: list[tuple[str, int, Callable[[sp.csr_array], np.ndarray]]] = [
        ("DSATUR", 2, dsatur),
        ("smallest-last greedy", 2, lambda g: greedy(g, smallest_last(g))),
        ("largest-first greedy", 1, lambda g: greedy(g, np.argsort(-np.diff(g.indptr), kind="stable"))),
        ("natural-order greedy", 1, lambda g: greedy(g, np.arange(g.shape[0]))),
    ]
    spent = 0
    for name, cost, run in orders:
        if best is not None and count(best) <= lower:
            break
        if spent + cost * graph.nnz > SEQUENTIAL_WORK:
            continue
        spent += cost * graph.nnz
        colours = run(graph)
        if best is None or count(colours) < count(best):
            best, method = colours, name
    if best is None:
        best, method = parallel_greedy(graph), "randomised largest-first greedy"
    return best, method


def greedy(graph: sp.csr_array, order: np.ndarray) -> np.ndarray:
    """Colour vertices in ``order``, each with the smallest colour none of its neighbours has."""
    indptr, indices = graph.indptr.tolist(), graph.indices.tolist()
    colour = [-1] * graph.shape[0]
    for v in order.tolist():
        used = 0
        for u in indices[indptr[v] : indptr[v + 1]]:
            if colour[u] >= 0:
                used |= 1 << colour[u]
        colour[v] = (~used & (used + 1)).bit_length() - 1
    return np.asarray(colour, dtype=np.int32)


def dsatur(graph: sp.csr_array) -> np.ndarray:
    """DSATUR: next the uncoloured vertex with the most distinct neighbour colours (then degree)."""
    indptr, indices = graph.indptr.tolist(), graph.indices.tolist()
    size = graph.shape[0]
    degree = np.diff(graph.indptr).tolist()
    colour = [-1] * size
    seen = [0] * size  # bit mask of the colours among each vertex's neighbours
    heap = [(0, -degree[v], v) for v in range(size)]
    heapq.heapify(heap)
    while heap:
        saturation, _, v = heapq.heappop(heap)
        if colour[v] >= 0 or -saturation != seen[v].bit_count():
            continue  # coloured already, or a stale entry
        c = (~seen[v] & (seen[v] + 1)).bit_length() - 1
        colour[v] = c
        for u in indices[indptr[v] : indptr[v + 1]]:
            if colour[u] < 0 and not seen[u] >> c & 1:
                seen[u] |= 1 << c
                heapq.heappush(heap, (-seen[u].bit_count(), -degree[u], u))
    return np.asarray(colour, dtype=np.int32)


def smallest_last(graph: sp.csr_array) -> np.ndarray:
    """The order that repeatedly removes a vertex of smallest remaining degree, reversed."""
    indptr, indices = graph.indptr.tolist(), graph.indices.tolist()
    degree = np.diff(graph.indptr).tolist()
    buckets: list[set[int]] = [set() for _ in range(max(degree, default=0) + 1)]
    for v, d in enumerate(degree):
        buckets[d].add(v)
    removed = [False] * graph.shape[0]
    order = []
    for _ in range(graph.shape[0]):
        low = next(d for d, bucket in enumerate(buckets) if bucket)
        v = buckets[low].pop()
        removed[v] = True
        order.append(v)
        for u in indices[indptr[v] : indptr[v + 1]]:
            if not removed[u]:
                buckets[degree[u]].discard(u)
                degree[u] -= 1
                buckets[degree[u]].add(u)
    return np.asarray(order[::-1], dtype=np.int64)


def smallest_free(vertices: int, owner: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """For each of ``vertices`` vertices the smallest colour >= 0 that none of its neighbours has:
    neighbour k belongs to vertex ``owner[k]`` and has colour ``taken[k]`` (-1: none yet)."""
    mine = taken >= 0
    owner, taken = owner[mine], taken[mine]
    used = np.zeros((vertices, count(taken) + 1), dtype=bool)
    used[owner, taken] = True
    return np.argmin(used, axis=1).astype(np.int32)


def parallel_greedy(graph: sp.csr_array) -> np.ndarray:
    """Greedy colouring in largest-first order, ties in a seeded random order, computed in rounds
    (Jones-Plassmann): the vertices whose earlier neighbours all have their colours take theirs,
    all at once. The colours are those of the sequential greedy in that order; each edge is
    visited twice in all (to colour a vertex, and to count down its later neighbours' waits)."""
    size = graph.shape[0]
    degree = np.diff(graph.indptr)
    priority = degree.astype(np.int64) * size + np.random.default_rng(SEED).permutation(size)
    source = np.repeat(np.arange(size), degree)
    waits = np.bincount(source[priority[graph.indices] > priority[source]], minlength=size)
    colour = np.full(size, -1, dtype=np.int32)
    ready = np.flatnonzero(waits == 0)
    while ready.size:
        rows = graph[ready]
        owner = np.repeat(np.arange(ready.size), np.diff(rows.indptr))
        colour[ready] = smallest_free(ready.size, owner, colour[rows.indices])
        later = rows.indices[priority[rows.indices] < priority[ready[owner]]]
        touched, counts = np.unique(later, return_counts=True)
        waits[touched] -= counts
        ready = touched[waits[touched] == 0]
    return colour


# ---- iterated greedy ------------------------------------------------------------------------


def iterated_greedy(graph: sp.csr_array, colours: np.ndarray, lower: int) -> tuple[np.ndarray, int]:
    """Culberson's iterated greedy from ``colours``: the colouring and the rounds run."""
    rng = np.random.default_rng(SEED)
    rounds = ITERATED_WORK // max(graph.nnz, 1)
    done = stalled = 0
    while done < rounds and stalled < PATIENCE and count(colours) > lower:
        classes = count(colours)
        draw = rng.random()
        if draw < 0.5:
            order = np.arange(classes)[::-1]
        elif draw < 0.8:
            order = np.argsort(-np.bincount(colours, minlength=classes), kind="stable")
        else:
            order = rng.permutation(classes)
        colours = recolour(graph, colours, order)
        done += 1
        stalled = 0 if count(colours) < classes else stalled + 1
    return colours, done


def recolour(graph: sp.csr_array, colours: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Greedy over the vertices taken colour class by colour class in ``order``. A class is an
    independent set: all its vertices take, at once, the smallest colour that none of their
    recoloured neighbours has, as they would one after another. Never more colours."""
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    position = rank[colours]
    members = np.argsort(position, kind="stable")
    bounds = np.searchsorted(position[members], np.arange(order.size + 1))
    rows = graph[members]
    indptr, indices = rows.indptr, rows.indices
    new = np.full(colours.size, -1, dtype=np.int32)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        owner = np.repeat(np.arange(b - a), np.diff(indptr[a : b + 1]))
        new[members[a:b]] = smallest_free(b - a, owner, new[indices[indptr[a] : indptr[b]]])
    return new
