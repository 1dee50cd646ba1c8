"""Two stencil residuals on an L x L grid (n = m = L^2, row-major, zero boundary), each written
the ways a user brings a function to jacrun for sparse Jacobians.

- **bratu**: F = 4 u_ij - (edge neighbours) - lam h^2 exp(u_ij), h = 1/(L+1): jacrun's
  built-in ``kind: bratu``, here as plain JAX and torch functions for ``autodiff: jax | torch``.
- **9-point Allen-Cahn**: F = (20 u_ij - 4 (edge neighbours) - (corner neighbours)) / 6
  + c (u_ij^3 - u_ij), which jacrun does not ship: a NumPy :class:`AllenCahn9` Function
  (kernels written as docs/writing-functions.md describes), and JAX and torch functions.

The JAX and torch versions are factories (annotated ``-> Callable``) that jacrun calls with the
config's params; each returns f of one sample, u (n,) -> F (n,). They import their framework
when called, so this module imports with NumPy alone. The benchmark's sparse section and the
tests use these definitions; ``job.yaml`` runs the JAX 9-point residual as a sparse job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from jacrun.functions import Function


def _neighbours(p: Any) -> tuple[Any, Any]:
    """(edge sum, corner sum) of the interior of a grid padded with one ring of zeros, (..., L+2, L+2)."""
    edges = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]
    corners = p[..., :-2, :-2] + p[..., :-2, 2:] + p[..., 2:, :-2] + p[..., 2:, 2:]
    return edges, corners


# ---- JAX -----------------------------------------------------------------------------------------


def bratu_jax(grid: int, lam: float = 6.0) -> Callable:
    """The Bratu residual of one sample in JAX (``kind: bratu``'s numbers)."""
    import jax.numpy as jnp

    scale = lam / (grid + 1) ** 2

    def residual(u):
        v = u.reshape(grid, grid)
        edges, _ = _neighbours(jnp.pad(v, 1))
        return (4 * v - edges - scale * jnp.exp(v)).reshape(-1)

    residual.n_in = grid * grid
    return residual


def allen_cahn_jax(grid: int, c: float = 1.0) -> Callable:
    """The 9-point Allen-Cahn residual of one sample in JAX."""
    import jax.numpy as jnp

    def residual(u):
        v = u.reshape(grid, grid)
        edges, corners = _neighbours(jnp.pad(v, 1))
        return ((20 * v - 4 * edges - corners) / 6 + c * (v**3 - v)).reshape(-1)

    residual.n_in = grid * grid
    return residual


# ---- torch ---------------------------------------------------------------------------------------


def bratu_torch(grid: int, lam: float = 6.0) -> Callable:
    """The Bratu residual of one sample in torch."""
    import torch

    scale = lam / (grid + 1) ** 2

    def residual(u):
        v = u.reshape(grid, grid)
        edges, _ = _neighbours(torch.nn.functional.pad(v, (1, 1, 1, 1)))
        return (4 * v - edges - scale * torch.exp(v)).reshape(-1)

    residual.n_in = grid * grid
    return residual


def allen_cahn_torch(grid: int, c: float = 1.0) -> Callable:
    """The 9-point Allen-Cahn residual of one sample in torch."""
    import torch

    def residual(u):
        v = u.reshape(grid, grid)
        edges, corners = _neighbours(torch.nn.functional.pad(v, (1, 1, 1, 1)))
        return ((20 * v - 4 * edges - corners) / 6 + c * (v**3 - v)).reshape(-1)

    residual.n_in = grid * grid
    return residual


# ---- NumPy ---------------------------------------------------------------------------------------


def stencil9(t: np.ndarray, grid: int) -> np.ndarray:
    """A t = (20 t - 4 (edge neighbours) - (corner neighbours)) / 6 for t (..., L^2)."""
    v = t.reshape(*t.shape[:-1], grid, grid)
    p = np.zeros((*v.shape[:-2], grid + 2, grid + 2), dtype=t.dtype)
    p[..., 1:-1, 1:-1] = v
    edges, corners = _neighbours(p)
    out = 20 * v - 4 * edges - corners
    out /= 6
    return out.reshape(t.shape)


def stencil9_pattern(grid: int) -> sp.csr_array:
    """The 9-point stencil's pattern on an L x L grid, (L^2, L^2), row-major."""
    index = np.arange(grid * grid).reshape(grid, grid)
    rows, cols = [], []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            here = index[max(0, -di) : grid - max(0, di), max(0, -dj) : grid - max(0, dj)]
            there = index[max(0, di) : grid - max(0, -di), max(0, dj) : grid - max(0, -dj)]
            rows.append(here.ravel())
            cols.append(there.ravel())
    row, col = np.concatenate(rows), np.concatenate(cols)
    shape = (grid * grid, grid * grid)
    return sp.csr_array((np.ones(row.size, dtype=bool), (row, col)), shape=shape)


class AllenCahn9(Function):
    """The 9-point Allen-Cahn residual as a jacrun Function: J(u) = A + diag(c (3 u^2 - 1)),
    A the symmetric 9-point stencil, so the VJP is the JVP. Shared vectors (a sparse job's
    seeds) get the stencil once for all samples."""

    def __init__(self, grid: int, c: float = 1.0, dtype: str = "float64") -> None:
        self.grid, self.c = grid, float(c)
        self.n_in = self.n_out = grid * grid
        self.dtype = np.dtype(dtype)

    def sparsity(self) -> sp.csr_array:
        return stencil9_pattern(self.grid)

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        return stencil9(x, self.grid) + self.c * (x**3 - x)

    def _product(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F(x), J(x) t) for t (B, K, n)."""
        y = self.forward_batch(x)
        diagonal = (self.c * (3 * x**2 - 1))[:, None, :]
        if t.shape[0] > 1 and t.strides[0] == 0:  # shared vectors: A t once for every sample
            return y, stencil9(t[0], self.grid)[None] + diagonal * t[0][None]
        return y, stencil9(t, self.grid) + diagonal * t

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._product(x, v)

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._product(x, t)

    def work_bytes(self, batch: int, k: int, mode: str) -> int:
        """The padded grid and its sums (a few (B, K, n) arrays), x^2 terms (B, n)."""
        return (6 * batch * k + 4 * batch) * self.n_in * self.dtype.itemsize
