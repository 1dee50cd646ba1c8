"""Sparse Jacobians: patterns, colourings, and the compression that turns C products into nonzeros.

A *pattern* is a scipy.sparse matrix (m, n) of the structural nonzeros of J(x), the same for
every x. Columns that share no row can share one tangent: a JVP with the sum of their unit
vectors returns each column's nonzeros untouched (forward mode, a *column colouring*). Dually,
rows that share no column share one cotangent (reverse mode, a *row colouring*). With C colours
a whole Jacobian costs C products instead of n (or m): 5 for a 5-point stencil of any size.

Colouring (:mod:`jacrun.colouring`) colours the columns of the pattern (fwd), or of its
transpose (rev), so that no row holds two of one colour: an exact lattice colouring where the
pattern is a stencil on a grid (5 colours for the 5-point stencil, 7 for the 3-D 7-point one),
else greedy orders, DSATUR and iterated greedy within a fixed amount of work.

:class:`SparseJacobian` is what a job keeps of it: the CSR pattern, the colouring and its mode.
Its ``seeds`` are the shared vectors a block feeds to ``jvp_batch`` / ``vjp_batch``, and
``gather`` reads every nonzero out of the compressed products (B, C, w) with one precomputed
index map: one vectorised take, no loop over rows, samples or colours. A function that can
form that gather without the products overrides ``Function.sparse_nonzeros`` (``bratu`` does);
one whose framework compiles the products and the gather together, for a whole block, provides
``Function.fused_nonzeros`` (the autodiff adapters do).

This module imports neither dask nor zarr.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp

from jacrun.colouring import Colouring, colour_columns, column_conflicts

if TYPE_CHECKING:
    from jacrun.functions import Function

Direction = Literal["fwd", "rev"]

CHUNK_BYTES = 2 << 20
"""Compressed products per kernel call in :meth:`SparseJacobian.evaluate`: a range of samples
(one at least) whose products the gather then reads from the cache, in buffers malloc reuses
(below the 4 MiB mmap threshold of :mod:`jacrun.memory`) instead of faulting in fresh pages."""


def as_pattern(matrix, shape: tuple[int, int]) -> sp.csr_array:
    """The canonical boolean CSR pattern of ``matrix`` (its stored entries that are nonzero).

    Raises ValueError when it is not a 2-D sparse or dense matrix of ``shape``.
    """
    if not (sp.issparse(matrix) or isinstance(matrix, np.ndarray)):
        raise ValueError(f"expected a scipy.sparse matrix of shape {shape}, got {type(matrix).__name__}")
    if matrix.ndim != 2 or tuple(matrix.shape) != tuple(shape):
        raise ValueError(f"has shape {tuple(matrix.shape)}; the Jacobian is (m, n) = {tuple(shape)}")
    pattern = sp.csr_array(matrix, dtype=bool)
    pattern.sum_duplicates()
    pattern.eliminate_zeros()
    pattern.sort_indices()
    return pattern


def read_pattern_file(path: Path, shape: tuple[int, int]) -> sp.csr_array:
    """The pattern saved by ``scipy.sparse.save_npz`` in ``path``; ValueError naming what is wrong."""
    try:
        matrix = sp.load_npz(path)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the user's file
        detail = str(exc) or type(exc).__name__
        raise ValueError(
            f"cannot read {path} as a sparse matrix ({detail}); write one with scipy.sparse.save_npz"
        ) from None
    try:
        return as_pattern(matrix, shape)
    except ValueError as exc:
        raise ValueError(f"{path} {exc}") from None


def dense_pattern(m: int, n: int) -> sp.csr_array:
    """Every entry a structural nonzero: the pattern of a function with no structure."""
    return sp.csr_array(np.ones((m, n), dtype=bool))


# ---- colouring ---------------------------------------------------------------------------------


def lines(pattern: sp.csr_array, direction: Direction) -> sp.csr_array:
    """The matrix whose columns a colouring colours, no two of one colour in a row: the pattern
    (fwd: its columns) or its transpose (rev: its rows)."""
    return pattern if direction == "fwd" else sp.csr_array(pattern.T)


def conflict_graph(pattern: sp.csr_array, direction: Direction) -> sp.csr_array:
    """Columns (fwd) or rows (rev) joined when they share a row (column): they need distinct colours."""
    return column_conflicts(lines(pattern, direction))


def colour(pattern: sp.csr_array, direction: Direction) -> Colouring:
    """Colour the columns (fwd) or rows (rev) of ``pattern``. The lower bound: the nonzeros of
    one row (fwd) or column (rev) conflict pairwise."""
    matrix = lines(sp.csr_array(pattern), direction)
    return colour_columns(matrix, int(np.diff(matrix.indptr).max(initial=0)))


def colouring(pattern: sp.csr_array, direction: Direction) -> np.ndarray:
    """Colours of the columns (fwd, length n) or rows (rev, length m) of ``pattern``."""
    return colour(pattern, direction).colours


# ---- the job's compression ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseJacobian:
    """A pattern with its colouring: the seeds a block multiplies by and the map back to nonzeros."""

    shape: tuple[int, int]
    indptr: np.ndarray = field(repr=False)
    indices: np.ndarray = field(repr=False)
    colours: np.ndarray = field(repr=False)
    """Colour of each column (fwd) or row (rev)."""
    direction: Direction
    source: str = "declared"
    """Where the pattern came from: ``declared`` (by the function), ``file`` or ``detected``."""
    colouring: str = "given"
    """How the colours were found (``given``: passed in, a stored colouring)."""
    colouring_seconds: float = 0.0
    """Seconds spent colouring (both directions where ``choose`` tried both)."""

    @classmethod
    def from_pattern(
        cls, pattern: sp.csr_array, direction: Direction, colours: np.ndarray | None = None, source: str = ""
    ) -> SparseJacobian:
        """Colour ``pattern`` (unless ``colours`` are given) for ``direction``."""
        pattern = as_pattern(pattern, pattern.shape)
        how, seconds = "given", 0.0
        if colours is None:
            found = colour(pattern, direction)
            colours, seconds = found.colours, found.seconds
            how = found.method + (", optimal" if found.optimal else "")
        return cls(
            shape=(int(pattern.shape[0]), int(pattern.shape[1])),
            indptr=pattern.indptr.astype(np.int64),
            indices=pattern.indices.astype(np.int64),
            colours=np.asarray(colours, dtype=np.int32),
            direction=direction,
            source=source or "declared",
            colouring=how,
            colouring_seconds=seconds,
        )

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    @property
    def n_colours(self) -> int:
        return int(self.colours.max(initial=-1)) + 1

    @property
    def width(self) -> int:
        """Length of a seed vector: n (fwd, tangents) or m (rev, cotangents)."""
        return self.shape[1] if self.direction == "fwd" else self.shape[0]

    @property
    def product_width(self) -> int:
        """Length of one compressed product: m (fwd, J times a seed) or n (rev, a seed times J)."""
        return self.shape[0] if self.direction == "fwd" else self.shape[1]

    @property
    def density(self) -> float:
        return self.nnz / max(self.shape[0] * self.shape[1], 1)

    @property
    def compression(self) -> float:
        """Products saved: n (fwd) or m (rev) over the colours."""
        return self.width / max(self.n_colours, 1)

    def pattern(self) -> sp.csr_array:
        data = np.ones(self.nnz, dtype=bool)
        return sp.csr_array((data, self.indices, self.indptr), shape=self.shape)

    @cached_property
    def rows(self) -> np.ndarray:
        """The row (output index) of every nonzero, in CSR order."""
        return np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.indptr))

    @cached_property
    def index_map(self) -> np.ndarray:
        """Where each nonzero sits in one sample's compressed products, flattened (C, w)."""
        if self.direction == "fwd":  # J[i, j] = (J S)[i, colour j]: at ydot[colour_j, i]
            return self.colours[self.indices].astype(np.int64) * self.shape[0] + self.rows
        return self.colours[self.rows].astype(np.int64) * self.shape[1] + self.indices  # (S^T J)[colour_i, j]

    def evaluate(
        self, function: Function, x: np.ndarray, out: np.ndarray | None = None, outputs: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(y (B, m), nonzeros (B, nnz)) of ``function`` at the rows of ``x``; the nonzeros go
        into ``out`` when given (a reused buffer spares the page faults of a fresh one). With
        ``outputs`` false, y is None: a function that forms the nonzeros without the products
        (see ``Function.sparse_nonzeros``) then skips computing it.

        A function with a fused path (``Function.fused_nonzeros``, the autodiff adapters)
        computes the whole block in one call.
        Otherwise ``function.sparse_nonzeros`` per range of samples: by default
        :meth:`gather_products`. Ranges hold about :data:`CHUNK_BYTES` of compressed products,
        so the gather reads them from the cache, and run on the kernel threads of
        :mod:`jacrun.functions.parallel` (one on a worker with one BLAS thread).
        """
        from jacrun.functions.parallel import for_row_ranges, kernel_threads

        fused = function.fused_nonzeros(x, self, out, outputs)
        if fused is not None:
            y, values = fused
            if outputs and y is None:
                raise TypeError(f"{type(function).__name__}.fused_nonzeros returned no y")
            if out is not None and values is not out:
                np.copyto(out, values)
                values = out
            return (y if outputs else None), values
        batch, dtype = x.shape[0], function.dtype
        span = self.kernel_rows(dtype.itemsize)
        threads = max(1, min(kernel_threads(), -(-batch // span)))
        y = np.empty((batch, self.shape[0]), dtype) if outputs else None
        values = np.empty((batch, self.nnz), dtype) if out is None else out
        _ = self.index_map  # built once, before the kernel threads share it

        def run(start: int, stop: int, slot: int) -> None:
            part = function.sparse_nonzeros(x[start:stop], self, values[start:stop], outputs)
            if y is not None:
                if part is None:
                    raise TypeError(f"{type(function).__name__}.sparse_nonzeros returned no y")
                y[start:stop] = part

        for_row_ranges(batch, threads, span, run)
        return y, values

    def gather_products(self, function: Function, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """y of x (B, n); into ``out`` the nonzeros gathered from one ``jvp_batch`` (fwd) or
        ``vjp_batch`` (rev) call with the C seeds as shared vectors."""
        kernel = function.jvp_batch if self.direction == "fwd" else function.vjp_batch
        seeds = self._seeds(function.dtype)
        y, compressed = kernel(x, np.broadcast_to(seeds, (x.shape[0], *seeds.shape)))
        self.gather(compressed, out=out)
        return y

    def kernel_rows(self, itemsize: int) -> int:
        """Samples per kernel call in :meth:`evaluate`: about CHUNK_BYTES of compressed products."""
        return max(1, CHUNK_BYTES // max(self.n_colours * self.product_width * itemsize, 1))

    def work_bytes(self, function: Function, rows: int) -> int:
        """Peak temporary memory of :meth:`evaluate` on ``rows`` samples: the function's fused
        path's (``Function.fused_work_bytes``) where it has one; else the seeds, and on each
        kernel thread one call's kernel work and compressed products."""
        from jacrun.functions.parallel import kernel_threads

        fused = function.fused_work_bytes(self, rows)
        if fused is not None:
            return int(fused)
        itemsize = function.dtype.itemsize
        span = min(rows, self.kernel_rows(itemsize))
        threads = max(1, min(kernel_threads(), -(-rows // span)))
        per_call = function.work_bytes(span, self.n_colours, "jvp" if self.direction == "fwd" else "vjp")
        compressed = span * self.n_colours * self.product_width * itemsize
        index = self.nnz * 8 * 2  # the index map and the row of every nonzero
        kept = function.sparse_cache_bytes(self)
        return self.n_colours * self.width * itemsize + index + kept + threads * (per_call + compressed)

    def seeds(self, k0: int, k1: int, dtype) -> np.ndarray:
        """Seed vectors k0:k1, (k1 - k0, width): row k sums the unit vectors of colour k."""
        return (np.arange(k0, k1, dtype=np.int32)[:, None] == self.colours[None, :]).astype(dtype)

    def _seeds(self, dtype) -> np.ndarray:
        """All C seeds, read-only, built once per dtype."""
        cache = self.__dict__.setdefault("_seed_cache", {})
        key = np.dtype(dtype).str
        if key not in cache:
            cache[key] = self.seeds(0, self.n_colours, dtype)
            cache[key].setflags(write=False)
        return cache[key]

    def gather(self, compressed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Nonzeros (B, nnz) in CSR order from the compressed products (B, C, product_width),
        into ``out`` when given. The index map is in bounds by construction: ``clip`` skips
        NumPy's bounds check (about 40% faster)."""
        batch = compressed.shape[0]
        return np.take(compressed.reshape(batch, -1), self.index_map, axis=1, out=out, mode="clip")

    def csr(self, values: np.ndarray) -> sp.csr_array:
        """One sample's Jacobian from its nonzeros (nnz,)."""
        return sp.csr_array((np.asarray(values), self.indices, self.indptr), shape=self.shape)

    @cached_property
    def digest(self) -> str:
        """sha256 of the pattern (shape, indptr, indices): what a resumed job must match."""
        h = hashlib.sha256(np.asarray(self.shape, dtype=np.int64).tobytes())
        h.update(self.indptr.tobytes())
        h.update(self.indices.tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        """JSON-able description for the store's attributes and the plan."""
        return {
            "format": "csr",
            "shape": list(self.shape),
            "nnz": self.nnz,
            "density": self.density,
            "colours": self.n_colours,
            "mode": self.direction,
            "compression": self.compression,
            "source": self.source,
            "colouring": self.colouring,
            "colouring_seconds": self.colouring_seconds,
            "pattern_sha256": self.digest,
        }

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for cached in ("rows", "index_map", "_seed_cache"):  # rebuilt on the worker, not shipped
            state.pop(cached, None)
        return state


def choose(pattern: sp.csr_array, strategy: Literal["fwd", "rev", "auto"], source: str) -> SparseJacobian:
    """Colour for ``strategy``; ``auto`` colours both ways and keeps the fewer colours (ties: rev)."""
    if strategy != "auto":
        return SparseJacobian.from_pattern(pattern, strategy, source=source)
    rev = SparseJacobian.from_pattern(pattern, "rev", source=source)
    if pattern.shape[0] == pattern.shape[1] and (pattern != pattern.T).nnz == 0:
        return rev  # symmetric: both conflict graphs are the same, so are their colourings
    fwd = SparseJacobian.from_pattern(pattern, "fwd", source=source)
    seconds = rev.colouring_seconds + fwd.colouring_seconds
    return replace(fwd if fwd.n_colours < rev.n_colours else rev, colouring_seconds=seconds)
