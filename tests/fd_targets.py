"""Plain NumPy functions for ``autodiff: fd`` tests, with their exact Jacobians."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp


def chain(x: np.ndarray) -> np.ndarray:
    """A batch (B, n) -> (B, n) with a tridiagonal Jacobian: sin(x_i) x_{i+1} + x_{i-1}^2 + exp(x_i / 2)."""
    left, right = np.zeros_like(x), np.zeros_like(x)
    left[:, 1:], right[:, :-1] = x[:, :-1], x[:, 1:]
    return np.sin(x) * right + left**2 + np.exp(0.5 * x)


def chain_jacobian(x: np.ndarray) -> np.ndarray:
    """The exact Jacobians of :func:`chain`, (B, n, n)."""
    b, n = x.shape
    right = np.zeros_like(x)
    right[:, :-1] = x[:, 1:]
    jac = np.zeros((b, n, n))
    i = np.arange(n)
    jac[:, i, i] = np.cos(x) * right + 0.5 * np.exp(0.5 * x)
    jac[:, i[:-1], i[:-1] + 1] = np.sin(x[:, :-1])
    jac[:, i[1:], i[1:] - 1] = 2 * x[:, :-1]
    return jac


def tridiagonal(n: int) -> sp.csr_array:
    return sp.csr_array(sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1]) != 0)


def chain_one(x: np.ndarray) -> np.ndarray:
    """:func:`chain` of one sample (n,) -> (n,): the per-sample (slow) path."""
    return chain(x[None])[0]


def make_chain(n: int = 8, delay: float = 0.0) -> Callable:
    """A factory: :func:`chain` with ``n_in`` and its declared pattern; ``delay`` seconds per call
    on more than 40 rows (a job's blocks, not the build's probes: a job slow enough to be
    killed part way)."""

    def f(x: np.ndarray) -> np.ndarray:
        if delay and x.shape[0] > 40:
            time.sleep(delay)
        return chain(x)

    f.n_in = n  # type: ignore[attr-defined]
    f.sparsity = tridiagonal(n)  # type: ignore[attr-defined]
    return f


def drops_imaginary(x: np.ndarray) -> np.ndarray:
    """Legacy code that casts to float: refused for the complex step."""
    return chain(np.asarray(x, dtype=np.float64) if not np.iscomplexobj(x) else x.real.astype(np.float64))


def with_conj(x: np.ndarray) -> np.ndarray:
    """|x|^2 as x conj(x): complex values, but the conjugate cancels the imaginary step (refused
    for the complex step)."""
    return chain(x) + x * np.conj(x)


def make_guarded(lower: float = 0.0, upper: float = 1.0) -> Callable:
    """:func:`chain` that fails when evaluated outside [lower, upper] (a domain, as of a log)."""

    def f(x: np.ndarray) -> np.ndarray:
        real = x.real
        if (real < lower).any() or (real > upper).any():
            raise AssertionError(f"f evaluated outside [{lower}, {upper}]: {real.min()}, {real.max()}")
        return chain(x)

    return f


class Counter:
    """:func:`chain` that counts its calls and the rows of each (``calls`` per instance)."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.rows.append(x.shape[0] if x.ndim == 2 else 1)
        return chain(x) if x.ndim == 2 else chain_one(x)
