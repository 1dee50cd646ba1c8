"""``autodiff: autograd``: ``make_vjp`` of a batched NumPy function (``batched: true``).

autograd has no vmap, so f is written for a batch, x (B, n) -> y (B, m), with independent rows:
then the VJP of the batched map with cotangent v_k (B, m) is row b's v_k[b] J(x_b), all rows at
once. On a block:

- vjp: one ``make_vjp`` (one forward pass, recorded), then its pullback for each of the K
  cotangents;
- jvp: the same pullback u -> J^T u is linear in u, so the VJP of the pullback itself gives
  J t (autograd's ``make_jvp_reversemode``): one forward pass, one trace of the pullback, then
  one pass per tangent.

autograd numbers its traces with a process-wide counter that is not thread-safe, so kernels
of this adapter run one at a time per process (a lock): prefer worker processes to worker
threads (``threads_per_worker: 1``, the default).
"""

from __future__ import annotations

import threading

import numpy as np
from autograd.core import make_vjp

from jacrun.functions.adapters import (
    AutodiffFunction,
    no_width_hint,
    numpy_factory_dtype,
    weights_unsupported,
)

TARGET_CLASSES: tuple[type, ...] = ()

_LOCK = threading.Lock()

# the backend hooks the adapter package looks up (shared with the other NumPy-array backend)
factory_dtype = numpy_factory_dtype
prepare = weights_unsupported
default_width = no_width_hint


def setup(*, dtype: np.dtype, threads: int | None) -> None:
    """Nothing to set: f runs NumPy, under the process's BLAS settings."""


class AutogradFunction(AutodiffFunction):
    """Kernels from autograd's reverse mode on the batched function."""

    backend = "autograd"

    def _compile(self) -> None:
        self._f = self._vector_fn()

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._f(x))

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, k = v.shape[:2]
        xbar = np.empty((b, k, self.n_in), dtype=self.dtype)
        with _LOCK:
            pullback, y = make_vjp(self._f, x)
            for j in range(k):
                xbar[:, j] = pullback(v[:, j])
        return np.asarray(y, dtype=self.dtype), xbar

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, k = t.shape[:2]
        ydot = np.empty((b, k, self.n_out), dtype=self.dtype)
        with _LOCK:
            pullback, y = make_vjp(self._f, x)
            y = np.asarray(y, dtype=self.dtype)
            push, _ = make_vjp(pullback, np.zeros_like(y))  # u -> J^T u is linear: its VJP is J t
            for j in range(k):
                ydot[:, j] = push(t[:, j])
        return y, ydot


Adapter = AutogradFunction
