"""The ``bratu`` kind: the residual of the 2-D Bratu problem on an L x L grid, n = m = L^2.

F(u)_ij = 4 u_ij - u_(i-1)j - u_(i+1)j - u_i(j-1) - u_i(j+1) - lam h^2 exp(u_ij), with zero
Dirichlet boundary (neighbours outside the grid are 0), h = 1/(L+1) and u in row-major order.
J(u) = A - diag(lam h^2 exp(u)), A the 5-point stencil matrix: symmetric, 5 nonzeros a row.

No matrix exists anywhere: both products are the stencil applied to the (B, K, L, L) view of
the vectors, minus the diagonal term. J is symmetric, so the VJP is the JVP. Shared vectors
(a broadcast view, as a sparse Jacobian's seeds are) get the stencil once for all samples.

A sparse Jacobian job's nonzeros skip the compressed products: see :meth:`Bratu.sparse_nonzeros`.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
from numpy.typing import DTypeLike
from pydantic import Field, PositiveInt

from jacrun.functions.base import Function, FunctionSpec, Mode
from jacrun.functions.linear import compute_dtype, is_shared, ufunc_buffer_bytes
from jacrun.functions.registry import register

if TYPE_CHECKING:
    from jacrun.sparsity import SparseJacobian

_PARTS_LOCK = threading.Lock()


class BratuSpec(FunctionSpec):
    """Config of ``kind: bratu``."""

    kind: Literal["bratu"] = "bratu"
    grid: PositiveInt = Field(description="L: the grid is L x L, n = m = L^2.")
    lam: float = Field(6.0, description="lambda, the strength of the exponential term.")


def stencil(t: np.ndarray, out: np.ndarray, grid: int) -> np.ndarray:
    """out = A t for t (..., L^2), the grid in row-major order: 4 t minus the four neighbours,
    zero outside the grid.

    Every neighbour is a shift of the whole flat row: NumPy runs those about 4x faster than
    the (L, L - 1) views of the grid's columns. The left and right shifts also reach across
    the ends of grid rows, so the entries they must not touch are copied out and put back.
    """
    np.multiply(t, 4, out=out)
    out[..., grid:] -= t[..., :-grid]
    out[..., :-grid] -= t[..., grid:]
    first = out[..., grid::grid].copy()  # column 0 of grid rows 1.., no left neighbour
    out[..., 1:] -= t[..., :-1]
    out[..., grid::grid] = first
    last = out[..., grid - 1 : -1 : grid].copy()  # column L-1 of grid rows ..L-2, no right one
    out[..., :-1] -= t[..., 1:]
    out[..., grid - 1 : -1 : grid] = last
    return out


def stencil_pattern(grid: int) -> sp.csr_array:
    """The 5-point stencil's pattern on an L x L grid, (L^2, L^2), row-major."""
    index = np.arange(grid * grid).reshape(grid, grid)
    rows, cols = [index.ravel()], [index.ravel()]
    for axis in (0, 1):
        for a, b in ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))):
            here = [slice(None), slice(None)]
            there = [slice(None), slice(None)]
            here[axis], there[axis] = a, b
            rows.append(index[tuple(here)].ravel())
            cols.append(index[tuple(there)].ravel())
    row, col = np.concatenate(rows), np.concatenate(cols)
    shape = (grid * grid, grid * grid)
    return sp.csr_array((np.ones(row.size, dtype=bool), (row, col)), shape=shape)


WHOLE_RANGE_BYTES = 256 << 10
"""Rows of nonzeros up to this size (L <= 64 in float64) are written one range at a time:
per-row calls held the GIL long enough that two kernel threads ran slower than one (L = 16:
390k against 870k Jacobians/s). Larger rows go one at a time, which is faster from L = 128."""


def _fill(rows: np.ndarray, parts: ColouredParts) -> None:
    """gather(A S) into ``rows``: a fill when it holds one value (about 12% faster at L = 256
    than copying it, which reads it too)."""
    if parts.fill is None:
        rows[...] = parts.base
    else:
        rows.fill(parts.fill)


@dataclass(frozen=True)
class ColouredParts:
    """What :meth:`Bratu.sparse_nonzeros` keeps of one colouring: gather(A S), and where
    gather(S) is 1 (the diagonal for a valid colouring) with the product entry it came from."""

    owner: SparseJacobian
    """The colouring they were built for (a later call with the same object skips the key)."""
    key: tuple
    base: np.ndarray
    """gather(A S) (nnz,): the nonzeros of A where the seeds' entries are 0."""
    positions: np.ndarray
    """The nonzeros where gather(S) = 1; J(x) S there is A S - c."""
    diagonal: np.ndarray
    """gather(A S) at those positions."""
    fill: float | None
    """The one value gather(A S) has everywhere else (-1, the stencil's neighbours), if it has one."""
    columns: np.ndarray | None
    """The entry of c each position takes; None when it is position i -> c_i."""


@register
class Bratu(Function):
    """2-D Bratu residual F: R^(L^2) -> R^(L^2)."""

    kind: ClassVar[str] = "bratu"
    description: ClassVar[str] = (
        "2-D Bratu residual on an L x L grid: 5-point Laplacian minus lam h^2 exp(u) (n = m = L^2)."
    )
    spec_model: ClassVar[type[FunctionSpec]] = BratuSpec

    def __init__(self, grid: int, lam: float = 6.0, dtype: DTypeLike = "float64") -> None:
        if grid < 1:
            raise ValueError(f"grid must be positive, got {grid}")
        self.grid = grid
        self.lam = float(lam)
        self.dtype = compute_dtype(dtype)
        self.n_in = self.n_out = grid * grid
        self._scale = self.lam / (grid + 1) ** 2  # lam h^2
        self._shared: tuple[np.ndarray, tuple, np.ndarray] | None = None
        """(read-only vectors, their view, A times that view): see _stencil_of_shared."""
        self._parts: ColouredParts | None = None
        """The last colouring's parts: see sparse_nonzeros."""

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> Bratu:
        assert isinstance(spec, BratuSpec)
        return cls(spec.grid, spec.lam, spec.dtype)

    def __repr__(self) -> str:
        return f"Bratu(grid={self.grid}, lam={self.lam}, dtype={self.dtype})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shared": None, "_parts": None}

    def sparsity(self) -> sp.csr_array:
        return stencil_pattern(self.grid)

    # ---- kernels -------------------------------------------------------------------------------

    def _source(self, x: np.ndarray) -> np.ndarray:
        """lam h^2 exp(u), (B, n): the diagonal of J is 4 minus it."""
        c = np.exp(x)
        c *= self.dtype.type(self._scale)
        return c

    def _residual(self, x: np.ndarray, c: np.ndarray) -> np.ndarray:
        """F(x) = A x - c, given c = lam h^2 exp(x)."""
        y = np.empty_like(x, order="C")
        stencil(x, y, self.grid)
        y -= c
        return y

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, self.dtype)
        return self._residual(x, self._source(x))

    def _product(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F(x), J(x) t) for t (B, K, n); J = J^T, so this is also the VJP."""
        x = np.asarray(x, self.dtype)
        t = np.asarray(t, self.dtype)
        c = self._source(x)
        y = self._residual(x, c)
        out = np.empty(t.shape, self.dtype)
        if is_shared(t) or t.shape[0] == 1:  # A t once, then J t = A t - c t for every sample
            np.multiply(c[:, None, :], t[0][None], out=out)
            np.subtract(self._stencil_of_shared(t[0])[None], out, out=out)
        else:
            stencil(t, out, self.grid)
            out -= c[:, None, :] * t
        return y, out

    def _stencil_of_shared(self, t: np.ndarray) -> np.ndarray:
        """A t for shared vectors t (K, n). When t is a view of a read-only array that owns
        its data (a sparse job's seeds, reused by every call of a block), A t is kept with a
        reference to that array and reused while the same view comes again."""
        root = t
        while isinstance(root.base, np.ndarray):
            root = root.base
        key = (t.__array_interface__["data"][0], t.shape, t.strides, t.dtype.str)
        cached = self._shared
        if cached is not None and cached[0] is root and cached[1] == key:
            return cached[2]
        result = stencil(t, np.empty(t.shape, self.dtype), self.grid)
        if root.flags.owndata and not root.flags.writeable:
            result.setflags(write=False)
            self._shared = (root, key, result)
        return result

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._product(x, v)

    def sparse_nonzeros(
        self, x: np.ndarray, sparse: SparseJacobian, out: np.ndarray, outputs: bool = True
    ) -> np.ndarray | None:
        """The gather of the compressed products without the products.

        With the one-hot seeds S, J(x) S = A S - c * S (J^T = J, so both directions), and the
        gather is linear: the nonzeros are gather(A S), the same for every sample, minus c_j
        where gather(S) = 1. Per sample that is one exp, one copy (a fill with -1 when the
        stencil's neighbours are all that is left) and one scatter of n values,
        instead of C products of n and a gather; the numbers are the same bit for bit while
        exp(u) is finite (where it overflows, the products also turn that column's -1s into
        NaN, as inf * 0; here they stay -1, the true entries). y (the stencil of x) is skipped
        unless ``outputs``.
        """
        parts = self._coloured_parts(sparse)
        x = np.asarray(x, self.dtype)
        c = self._source(x)
        y = self._residual(x, c) if outputs else None
        if parts.columns is not None:
            c = c[:, parts.columns]
        diagonal = np.subtract(parts.diagonal, c, out=c)
        if out.shape[1] * out.itemsize <= WHOLE_RANGE_BYTES:  # one call each for all the rows
            _fill(out, parts)
            out[:, parts.positions] = diagonal
            return y
        for row, values in zip(out, diagonal, strict=True):
            _fill(row, parts)
            row[parts.positions] = values
        return y

    def _coloured_parts(self, sparse: SparseJacobian) -> ColouredParts:
        """The parts of ``sparse``'s colouring, built once (under a lock: kernel threads share it)."""
        parts = self._parts
        if parts is not None and parts.owner is sparse:
            return parts
        key = (sparse.digest, sparse.direction, sparse.colours.tobytes(), self.dtype.str)
        with _PARTS_LOCK:
            if self._parts is None or self._parts.key != key:
                self._parts = None  # the last colouring's memory goes first
                seeds = sparse.seeds(0, sparse.n_colours, self.dtype)
                products = stencil(seeds, np.empty_like(seeds), self.grid)
                base = sparse.gather(products[None])[0]
                ones = sparse.gather(seeds[None])[0]
                positions = np.flatnonzero(ones)
                columns = sparse.index_map[positions] % self.n_in
                identity = np.array_equal(columns, np.arange(self.n_in))
                rest = np.delete(base, positions)
                bits = rest.view(f"u{rest.itemsize}")  # one value to the bit (0.0 is not -0.0)
                fill = float(rest[0]) if rest.size and (bits == bits[0]).all() else None
                self._parts = ColouredParts(
                    sparse, key, base, positions, base[positions], fill, None if identity else columns
                )
            elif self._parts.owner is not sparse:  # the same colouring in another object
                self._parts = dataclasses.replace(self._parts, owner=sparse)
            return self._parts

    def sparse_cache_bytes(self, sparse: SparseJacobian) -> int:
        """gather(A S), its positions and their entries of c; A S and S while they are built."""
        built = 2 * sparse.n_colours * self.n_in * self.dtype.itemsize
        return sparse.nnz * self.dtype.itemsize + self.n_in * (16 + self.dtype.itemsize) + built

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._product(x, t)

    # ---- cost model ----------------------------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """exp(u) (B, n), and A t (K, n) for shared vectors or c t (B, K, n) for per-sample ones."""
        n, item = self.n_in, self.dtype.itemsize
        return (batch * n + batch * k * n) * item + ufunc_buffer_bytes(self.dtype)

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        return float(batch * self.n_in * (8 + 7 * k))
