"""Colourings (jacrun/colouring.py, jacrun/lattice.py): optimal on stencils, never more colours
than asdex, proper on every pattern, the same colours for the same pattern, bounded work."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from jacrun import colouring as col
from jacrun.sparsity import as_pattern, choose, colour, conflict_graph
from tests.helpers import valid_colouring

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from jacrun_bench.colourings import asdex_colours as asdex_count  # noqa: E402
from jacrun_bench.colourings import random_pattern, stencil_pattern  # noqa: E402


def stencil(kind: str, grid: int, dims: int, periodic: bool = False) -> sp.csr_array:
    return as_pattern(stencil_pattern(kind, dims, grid, periodic), (grid**dims,) * 2)


# (kind, dims, the fewest colours: a stencil's points conflict pairwise), small grids of each
STENCILS = [("star", 2, 5, [4, 12]), ("box", 2, 9, [5, 16]), ("star", 3, 7, [6, 12]), ("box", 3, 27, [6, 8])]
CASES = [(kind, dims, best, grid) for kind, dims, best, grids in STENCILS for grid in grids]


def name(case) -> str:
    kind, dims, best, grid = case
    return f"{best}-point-{dims}d-L{grid}" if kind == "star" else f"{best}-box-{dims}d-L{grid}"


@pytest.mark.parametrize("case", CASES, ids=name)
def test_stencils_get_their_optimal_colouring(case) -> None:
    """The optimum, in both directions (the 1.2x target, met exactly), found as a lattice
    without building the conflict graph; proper row by row."""
    kind, dims, best, grid = case
    pattern = stencil(kind, dims=dims, grid=grid)
    for direction in ("fwd", "rev"):
        found = colour(pattern, direction)
        assert found.count == best and found.optimal and found.lower_bound == best, found
        assert found.method.startswith("lattice") and valid_colouring(pattern, found.colours, direction)


@pytest.mark.parametrize(
    ("kind", "dims", "best", "grid"), [("star", 2, 5, 10), ("star", 3, 7, 7), ("box", 2, 9, 9)]
)
def test_periodic_stencils_get_a_lattice_where_it_wraps_around(kind, dims, best, grid) -> None:
    """On a torus whose side the colour count divides, the lattice colouring still fits."""
    pattern = stencil(kind, dims=dims, grid=grid, periodic=True)
    found = colour(pattern, "rev")
    assert found.count == best and valid_colouring(pattern, found.colours, "rev")


def test_a_lattice_that_does_not_wrap_around_is_refused() -> None:
    """A 5-point stencil on an 11 x 11 torus: (i + 2j) mod 5 would give both ends of a grid
    line one colour. What is kept is proper, with more colours."""
    pattern = stencil("star", dims=2, grid=11, periodic=True)
    found = colour(pattern, "rev")
    assert valid_colouring(pattern, found.colours, "rev")
    assert found.count > 5 and "mod 5" not in found.method, found


def test_a_lattice_is_checked_on_every_row_not_just_the_sampled_ones(monkeypatch) -> None:
    """A 3-D 7-point stencil with one more entry in row 0, at the point (7, 7, 7), which
    (i + 2j + 3k) mod 7 colours as it colours (0, 0, 0); the conflicts the lattice search reads
    (a sample, on a large pattern) miss it. The colouring kept must be proper on every row."""
    grid = 8
    clean = stencil("star", dims=3, grid=grid)
    pattern = clean.tolil()
    pattern[0, 7 * grid * grid + 7 * grid + 7] = True
    pattern = as_pattern(pattern, pattern.shape)
    sampled = col.sample_conflicts(clean)
    monkeypatch.setattr(col, "sample_conflicts", lambda lines: sampled)
    found = colour(pattern, "fwd")
    assert valid_colouring(pattern, found.colours, "fwd") and "mod 7" not in found.method, found.method


def asdex_colours(pattern: sp.csr_array, direction: str) -> int:
    asdex = pytest.importorskip("asdex")
    if direction == "fwd":
        return asdex_count(pattern)[0]
    coo = pattern.tocoo()
    theirs = asdex.SparsityPattern.from_coo(coo.row.astype(np.int32), coo.col.astype(np.int32), pattern.shape)
    return asdex.color_rows(theirs)[1]


def test_never_more_colours_than_asdex() -> None:
    """The stencils above (zero and periodic boundaries) and random patterns, both directions."""
    patterns = [stencil(kind, dims=dims, grid=grid) for kind, dims, _, grid in CASES]
    patterns += [
        stencil("star", dims=2, grid=11, periodic=True),
        stencil("star", dims=3, grid=8, periodic=True),
    ]
    patterns += [random_pattern(seed, (60 + 20 * seed, 50), 0.06) for seed in range(4)]
    for pattern in patterns:
        for direction in ("fwd", "rev"):
            ours, theirs = colour(pattern, direction).count, asdex_colours(pattern, direction)
            assert ours <= theirs, (pattern.shape, direction, ours, theirs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("direction", ["fwd", "rev"])
def test_every_path_colours_random_patterns_properly(seed: int, direction: str, monkeypatch) -> None:
    """The sequential greedy orders, and with no budget for them the parallel greedy; then
    iterated greedy, which never adds a colour."""
    pattern = random_pattern(seed, (70, 50), 0.08)
    graph = conflict_graph(pattern, direction)
    found = colour(pattern, direction)
    assert valid_colouring(pattern, found.colours, direction)
    assert found.count <= np.diff(graph.indptr).max() + 1  # the greedy bound
    monkeypatch.setattr(col, "SEQUENTIAL_WORK", 0)
    parallel = colour(pattern, direction)
    assert parallel.method.startswith("randomised largest-first") and valid_colouring(
        pattern, parallel.colours, direction
    )
    start = col.parallel_greedy(graph)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        again = col.recolour(graph, start, rng.permutation(col.count(start)))
        assert valid_colouring(pattern, again, direction) and col.count(again) <= col.count(start)
        start = again


def test_the_parallel_greedy_is_the_sequential_greedy_in_its_order() -> None:
    graph = conflict_graph(random_pattern(7, (120, 90), 0.05), "fwd")
    size = graph.shape[0]
    degree = np.diff(graph.indptr)
    order = np.lexsort((-np.random.default_rng(col.SEED).permutation(size), -degree))
    np.testing.assert_array_equal(col.parallel_greedy(graph), col.greedy(graph, order))


def test_iterated_greedy_stops_within_its_budget(monkeypatch) -> None:
    pattern = random_pattern(3, (200, 150), 0.04)
    graph = conflict_graph(pattern, "fwd")
    monkeypatch.setattr(col, "ITERATED_WORK", 7 * graph.nnz)
    _, rounds = col.iterated_greedy(graph, col.greedy(graph, np.arange(graph.shape[0])), 1)
    assert rounds == 7
    monkeypatch.setattr(col, "ITERATED_WORK", 10**9)
    monkeypatch.setattr(col, "PATIENCE", 3)
    _, rounds = col.iterated_greedy(graph, col.dsatur(graph), 1)
    assert 3 <= rounds < 1000


def digest(colours: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(colours, dtype=np.int32).tobytes()).hexdigest()


DETERMINISM = """
import hashlib, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_colouring import random_pattern, stencil
from jacrun import colouring as col
from jacrun.sparsity import colour
col.SEQUENTIAL_WORK = 0
for pattern in (stencil("star", dims=3, grid=7), random_pattern(5, (90, 60), 0.07)):
    print(hashlib.sha256(colour(pattern, "fwd").colours.astype(np.int32).tobytes()).hexdigest())
"""


def test_the_same_pattern_gets_the_same_colours_in_another_process(monkeypatch) -> None:
    """Within a process and in a fresh one with another hash seed: a store's colouring can be
    recomputed. The random pattern takes the seeded parallel greedy and iterated greedy."""
    monkeypatch.setattr(col, "SEQUENTIAL_WORK", 0)
    patterns = (stencil("star", dims=3, grid=7), random_pattern(5, (90, 60), 0.07))
    here = [digest(colour(pattern, "fwd").colours) for pattern in patterns]
    assert here == [digest(colour(pattern, "fwd").colours) for pattern in patterns]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    script = DETERMINISM.format(tests=os.path.dirname(__file__))
    there = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert there.stdout.split() == here


def test_choose_reports_the_colouring_and_its_time() -> None:
    sparse = choose(stencil("star", dims=3, grid=6), "auto", "declared")
    assert (
        sparse.n_colours == 7
        and sparse.colouring.endswith(", optimal")
        and "mod 7 on a 6 x 6 x 6 grid" in sparse.colouring
    )
    assert 0 < sparse.colouring_seconds < 60
    summary = sparse.summary()
    assert (
        summary["colouring"] == sparse.colouring and summary["colouring_seconds"] == sparse.colouring_seconds
    )
