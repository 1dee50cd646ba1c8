"""A black-box NumPy function for ``autodiff: fd``: jacrun differentiates it by finite differences.

``residual`` is a factory (its return annotation says it returns a callable): jacrun calls it
once per worker with the config's params and dtype, and differences the function it returns,
f(u) for a batch u (B, L^2) -> (B, L^2): the residual of a nonlinear Poisson problem on an L x L
grid with the compact 9-point Laplacian (zero boundary),

    r = (20 u - 4 (N + S + E + W) - (NE + NW + SE + SW)) / 6 - lam h^2 exp(u),

standing in for code nobody will port to an autodiff framework. Rows are independent
(``batched: true``). Two attributes help jacrun: ``n_in`` (the length of one sample) and
``sparsity``, the 9-point pattern (a function returning a scipy.sparse matrix (m, n)), which
``sparsity: auto`` colours: 9 colours at any L, so a Jacobian costs 9 evaluations of f (one
per colour, forward differences) instead of L^2. Written with NumPy operations that carry an
imaginary part (no abs, no casts to real), so ``method: complex`` works too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp


def residual(grid: int = 64, lam: float = 1.0, dtype: str = "float64") -> Callable[[np.ndarray], np.ndarray]:
    """f(u) (B, grid^2) -> (B, grid^2), with ``f.n_in`` and ``f.sparsity``."""
    h2 = 1.0 / (grid + 1) ** 2

    def f(u: np.ndarray) -> np.ndarray:
        v = u.reshape(u.shape[0], grid, grid)
        p = np.zeros((u.shape[0], grid + 2, grid + 2), dtype=u.dtype)
        p[:, 1:-1, 1:-1] = v
        edges = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
        corners = p[:, :-2, :-2] + p[:, :-2, 2:] + p[:, 2:, :-2] + p[:, 2:, 2:]
        r = (20 * v - 4 * edges - corners) / 6 - lam * h2 * np.exp(v)
        return r.reshape(u.shape[0], -1)

    f.n_in = grid * grid  # type: ignore[attr-defined]
    f.sparsity = lambda: pattern(grid)  # type: ignore[attr-defined]
    return f


def pattern(grid: int) -> sp.csr_array:
    """The 9-point stencil's pattern: input (a, b) reaches outputs (a +- 1, b +- 1)."""
    band = sp.diags_array([np.ones(grid - 1), np.ones(grid), np.ones(grid - 1)], offsets=[-1, 0, 1])
    return sp.csr_array(sp.kron(band, band, format="csr") != 0)
