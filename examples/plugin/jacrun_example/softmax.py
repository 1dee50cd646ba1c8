"""Class probabilities of multinomial logistic regression: y = softmax((W x + b) / T).

The Jacobian of softmax is diag(y) - y y^T, so with z = (W x + b) / T:

- JVP: zdot = W t / T, ydot = y * (zdot - <y, zdot>)
- VJP: s = y * (v - <y, v>), xbar = W^T s / T

Both are batched over samples and vectors: one forward pass, then one matrix product of all
B * K vectors against W. No Python loop over samples or vectors.

``w - <y, w>`` cancels when y is nearly one-hot (a confident classifier): the entries of the
Jacobian are then tiny against the rounding of w. Shifting w by its value at the top class
first, ``(w - w_top) - <y, w - w_top>``, keeps them accurate; ``jacrun check`` (its
``dot_product`` and ``basis`` rows) is how this was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from jacrun.functions import Function
from jacrun.functions.base import Mode


class SoftmaxRegression(Function):
    """softmax((W x + b) / temperature): R^n_in -> class probabilities in R^n_out."""

    description = "Class probabilities of multinomial logistic regression."

    def __init__(
        self,
        n_in: int,
        n_out: int,
        seed: int = 0,
        temperature: float = 1.0,
        weights: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        dtype: np.dtype | str = "float64",
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.n_in, self.n_out, self.dtype = int(n_in), int(n_out), np.dtype(dtype)
        rng = np.random.default_rng(seed)
        if weights is None:
            weights = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
        if bias is None:
            bias = np.zeros(n_out)
        self.weights = np.ascontiguousarray(weights, dtype=self.dtype)  # (m, n), torch layout
        self.bias = np.ascontiguousarray(bias, dtype=self.dtype)
        if self.weights.shape != (self.n_out, self.n_in) or self.bias.shape != (self.n_out,):
            raise ValueError(f"weights must be ({n_out}, {n_in}) and bias ({n_out},)")
        self.temperature = float(temperature)

    # ---- kernels ---------------------------------------------------------------------------

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        z = (x @ self.weights.T + self.bias) / self.dtype.type(self.temperature)
        z -= z.max(axis=1, keepdims=True)  # stable: softmax is shift-invariant
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = self.forward_batch(x)
        yk = y[:, None, :]
        s = yk * _centred(v, y)  # (B, K, m), a new array
        b, k, m = s.shape
        xbar = (s.reshape(b * k, m) @ self.weights).reshape(b, k, self.n_in)
        xbar /= self.dtype.type(self.temperature)
        return y, xbar

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = self.forward_batch(x)
        yk = y[:, None, :]
        b, k, n = t.shape
        # t may be a read-only broadcast view: reshape copies it when needed, never writes.
        zdot = (t.reshape(b * k, n) @ self.weights.T).reshape(b, k, self.n_out)
        zdot /= self.dtype.type(self.temperature)
        ydot = yk * _centred(zdot, y)
        return y, ydot

    # ---- cost model for the planner --------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """Temporaries besides inputs and results: z and y (B, m), three (B, K, m) arrays, and
        in jvp the copy that reshaping a broadcast t makes (B, K, n)."""
        elements = 2 * batch * self.n_out + 3 * batch * k * self.n_out
        if mode == "jvp":
            elements += batch * k * self.n_in
        return elements * self.dtype.itemsize

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        """2 B m n for the forward product, 2 B K m n for the vector product, plus softmax."""
        matmul = 2.0 * batch * self.n_in * self.n_out
        return matmul * (1 + k) + 5.0 * batch * self.n_out * (1 + k)


def _centred(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    """w - <y, w> over the last axis, w (B, K, m), y (B, m), shifted by the top class of y."""
    top = np.argmax(y, axis=1)[:, None, None]
    d = w - np.take_along_axis(w, top, axis=2)  # exactly 0 at the top class
    return d - np.sum(d * y[:, None, :], axis=2, keepdims=True)


def from_weights(
    path: str, temperature: float = 1.0, dtype: Literal["float32", "float64"] = "float64"
) -> SoftmaxRegression:
    """A factory: load ``W`` (m, n) and ``b`` (m,) from an .npz file, e.g. a trained model.

    ``params`` are passed verbatim, so give ``path`` as an absolute path.
    """
    with np.load(Path(path)) as data:
        weights, bias = data["W"], data["b"]
    n_out, n_in = weights.shape
    return SoftmaxRegression(n_in, n_out, temperature=temperature, weights=weights, bias=bias, dtype=dtype)
