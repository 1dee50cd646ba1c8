"""The ``bratu`` kind: the residual of the 2-D Bratu problem on an L x L grid, n = m = L^2.

F(u)_ij = 4 u_ij - u_(i-1)j - u_(i+1)j - u_i(j-1) - u_i(j+1) - lam h^2 exp(u_ij), with zero
Dirichlet boundary (neighbours outside the grid are 0), h = 1/(L+1) and u in row-major order.
J(u) = A - diag(lam h^2 exp(u)), A the 5-point stencil matrix: symmetric, 5 nonzeros a row.

No matrix exists anywhere: both products are the stencil applied to the (B, K, L, L) view of
the vectors, minus the diagonal term. J is symmetric, so the VJP is the JVP. Shared vectors
(a broadcast view, as a sparse Jacobian's seeds are) get the stencil once for all samples.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import scipy.sparse as sp
from numpy.typing import DTypeLike
from pydantic import Field, PositiveInt

from jacrun.functions.base import Function, FunctionSpec, Mode
from jacrun.functions.linear import compute_dtype, is_shared, ufunc_buffer_bytes
from jacrun.functions.registry import register


class BratuSpec(FunctionSpec):
    """Config of ``kind: bratu``."""

    kind: Literal["bratu"] = "bratu"
    grid: PositiveInt = Field(description="L: the grid is L x L, n = m = L^2.")
    lam: float = Field(6.0, description="lambda, the strength of the exponential term.")


def stencil(t: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = A t on the last two axes (L, L): 4 t minus the four neighbours, zero outside."""
    np.multiply(t, 4, out=out)
    out[..., 1:, :] -= t[..., :-1, :]
    out[..., :-1, :] -= t[..., 1:, :]
    out[..., :, 1:] -= t[..., :, :-1]
    out[..., :, :-1] -= t[..., :, 1:]
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

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> Bratu:
        assert isinstance(spec, BratuSpec)
        return cls(spec.grid, spec.lam, spec.dtype)

    def __repr__(self) -> str:
        return f"Bratu(grid={self.grid}, lam={self.lam}, dtype={self.dtype})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shared": None}

    def sparsity(self) -> sp.csr_array:
        return stencil_pattern(self.grid)

    # ---- kernels -------------------------------------------------------------------------------

    def _grids(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(*a.shape[:-1], self.grid, self.grid)

    def _source(self, x: np.ndarray) -> np.ndarray:
        """lam h^2 exp(u), (B, n): the diagonal of J is 4 minus it."""
        c = np.exp(x)
        c *= self.dtype.type(self._scale)
        return c

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, self.dtype)
        y = np.empty_like(x, order="C")
        stencil(self._grids(x), self._grids(y))
        y -= self._source(x)
        return y

    def _product(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F(x), J(x) t) for t (B, K, n); J = J^T, so this is also the VJP."""
        x = np.asarray(x, self.dtype)
        t = np.asarray(t, self.dtype)
        c = self._source(x)
        y = np.empty_like(x, order="C")
        stencil(self._grids(x), self._grids(y))
        y -= c
        out = np.empty(t.shape, self.dtype)
        if is_shared(t) or t.shape[0] == 1:  # A t once, then J t = A t - c t for every sample
            np.multiply(c[:, None, :], t[0][None], out=out)
            np.subtract(self._stencil_of_shared(t[0])[None], out, out=out)
        else:
            stencil(self._grids(t), self._grids(out))
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
        result = stencil(self._grids(t), np.empty((t.shape[0], self.grid, self.grid), self.dtype))
        result = result.reshape(t.shape[0], -1)
        if root.flags.owndata and not root.flags.writeable:
            result.setflags(write=False)
            self._shared = (root, key, result)
        return result

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._product(x, v)

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._product(x, t)

    # ---- cost model ----------------------------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """exp(u) (B, n), and A t (K, n) for shared vectors or c t (B, K, n) for per-sample ones."""
        n, item = self.n_in, self.dtype.itemsize
        return (batch * n + batch * k * n) * item + ufunc_buffer_bytes(self.dtype)

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        return float(batch * self.n_in * (8 + 7 * k))
