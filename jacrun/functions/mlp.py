"""The ``mlp`` kind: a dense network with one activation between layers (none after the last).

Layer i maps a -> W_i a + b_i with W_i of shape (out_i, in_i), the layout of
``torch.nn.Linear.weight``, so a PyTorch state dict exports directly to the weights file.

Kernels fold the K vectors into the GEMM row dimension: a (B, K, h) vector batch is viewed as
(B*K, h) and each layer costs one GEMM plus one broadcast multiply by the activation
derivative sigma'(z) (B, h), which a single forward pass computes for all K vectors.
- vjp: forward pass storing sigma'(z) per hidden layer (overwriting z), then the reverse sweep.
- jvp: tangents travel with the forward pass; nothing is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from numpy.typing import ArrayLike, DTypeLike
from pydantic import Field, PositiveInt, model_validator

from jacrun.functions import activations
from jacrun.functions.activations import ActivationName
from jacrun.functions.base import Function, FunctionSpec, Mode
from jacrun.functions.linear import (
    compute_dtype,
    expand,
    kernel_mode,
    scale_rows,
    ufunc_buffer_bytes,
    vectors_matmul,
)
from jacrun.functions.registry import register
from jacrun.paths import InputPath


class MLPSpec(FunctionSpec):
    """Config of ``kind: mlp``."""

    kind: Literal["mlp"] = "mlp"
    sizes: list[PositiveInt] = Field(
        min_length=2, description="Layer widths: n_in, hidden widths..., n_out (at least two)."
    )
    activation: ActivationName = Field(
        "tanh", description="Between layers, not after the last (gelu: tanh approximation)."
    )
    seed: int = Field(
        0,
        description="Without weights: W_i ~ N(0, 2/(in+out)), b_i ~ N(0, 0.01), "
        "layer by layer from default_rng(seed).",
    )
    weights: InputPath | None = Field(
        None,
        description=".npz holding W0, b0, W1, b1, ...; W_i of shape (out_i, in_i) "
        "(torch.nn.Linear.weight), b_i of shape (out_i,).",
    )

    @model_validator(mode="after")
    def _seed_or_weights(self) -> MLPSpec:
        if self.weights is not None and "seed" in self.model_fields_set:
            raise ValueError("seed cannot be combined with weights (the file fixes the weights)")
        return self


def glorot_weights(sizes: Sequence[int], seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """W_i ~ N(0,1) sqrt(2/(in+out)), b_i ~ N(0, 0.1^2), drawn W0, b0, W1, ... from one rng."""
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        weights.append(rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / (n_in + n_out)))
        biases.append(0.1 * rng.standard_normal(n_out))
    return weights, biases


def load_weights(path: Path, sizes: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Read W0, b0, W1, b1, ... from an .npz and check every shape against ``sizes``."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"weights file {path} must be an .npz archive holding W0, b0, W1, b1, ...")
    sizes = list(sizes)
    with data:
        layers = len(sizes) - 1
        expected: dict[str, tuple[int, ...]] = {}
        for i in range(layers):
            expected[f"W{i}"] = (sizes[i + 1], sizes[i])
            expected[f"b{i}"] = (sizes[i + 1],)
        extra = sorted(set(data.files) - set(expected))
        if extra:
            raise ValueError(
                f"weights file {path}: unexpected arrays {', '.join(extra)} "
                f"(sizes {sizes} has {layers} layers: {', '.join(expected)})"
            )
        arrays: dict[str, np.ndarray] = {}
        for name, shape in expected.items():
            if name not in data.files:
                raise ValueError(f"weights file {path}: missing {name}, expected shape {shape}")
            arr = data[name]
            if arr.shape != shape:
                raise ValueError(
                    f"weights file {path}: {name} has shape {arr.shape}, expected {shape} "
                    f"for sizes {sizes} (W_i is (out_i, in_i) as in torch.nn.Linear.weight)"
                )
            if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
                raise ValueError(f"weights file {path}: {name} must hold finite numbers")
            arrays[name] = arr
    return [arrays[f"W{i}"] for i in range(layers)], [arrays[f"b{i}"] for i in range(layers)]


@register
class MLP(Function):
    """Dense layers a -> sigma(W a + b), the last one without sigma."""

    kind: ClassVar[str] = "mlp"
    description: ClassVar[str] = (
        "Dense network (sizes, activation); random Glorot or PyTorch-layout .npz weights."
    )
    spec_model: ClassVar[type[FunctionSpec]] = MLPSpec

    def __init__(
        self,
        weights: Sequence[ArrayLike],
        biases: Sequence[ArrayLike],
        activation: str = "tanh",
        dtype: DTypeLike = "float64",
    ) -> None:
        self.dtype = compute_dtype(dtype)
        self._act = activations.activation(activation)
        self.activation = activation
        if not weights or len(weights) != len(biases):
            raise ValueError(
                f"need one bias per weight matrix and at least one layer, "
                f"got {len(weights)} weights and {len(biases)} biases"
            )
        ws: list[np.ndarray] = []
        bs: list[np.ndarray] = []
        for i, (w_in, b_in) in enumerate(zip(weights, biases, strict=True)):
            w = np.array(w_in, dtype=self.dtype, order="C")
            b = np.array(b_in, dtype=self.dtype)
            if w.ndim != 2 or 0 in w.shape:
                raise ValueError(f"W{i} must be a non-empty 2-D (out, in) array, got {w.shape}")
            if ws and w.shape[1] != ws[-1].shape[0]:
                raise ValueError(
                    f"W{i} has shape {w.shape}, expected ({w.shape[0]}, {ws[-1].shape[0]}): "
                    f"its input size must be the output size of W{i - 1}"
                )
            if b.shape != (w.shape[0],):
                raise ValueError(f"b{i} has shape {b.shape}, expected ({w.shape[0]},)")
            w.setflags(write=False)
            b.setflags(write=False)
            ws.append(w)
            bs.append(b)
        self.weights: tuple[np.ndarray, ...] = tuple(ws)
        self.biases: tuple[np.ndarray, ...] = tuple(bs)
        self.sizes: tuple[int, ...] = (ws[0].shape[1], *(w.shape[0] for w in ws))
        self.n_in, self.n_out = self.sizes[0], self.sizes[-1]

    @classmethod
    def random(
        cls,
        sizes: Sequence[int],
        activation: str = "tanh",
        seed: int = 0,
        dtype: DTypeLike = "float64",
    ) -> MLP:
        """Glorot-scaled random weights (see :func:`glorot_weights`)."""
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be at least two positive widths, got {list(sizes)}")
        return cls(*glorot_weights(sizes, seed), activation, dtype)

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> MLP:
        assert isinstance(spec, MLPSpec)
        if spec.weights is None:
            return cls.random(spec.sizes, spec.activation, spec.seed, spec.dtype)
        return cls(*load_weights(spec.weights, spec.sizes), spec.activation, spec.dtype)

    def __repr__(self) -> str:
        return f"MLP(sizes={list(self.sizes)}, activation={self.activation!r}, dtype={self.dtype})"

    # ---- kernels -------------------------------------------------------------------------------

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        a = np.asarray(x, self.dtype)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            z = a @ w.T
            z += b
            a = self._act.fn(z, z)
        y = a @ self.weights[-1].T
        y += self.biases[-1]
        return y

    def _forward_storing(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """y and sigma'(z) of every hidden layer, each overwriting its z."""
        a = x
        derivs: list[np.ndarray] = []
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            z = a @ w.T
            z += b
            a = self._act.fn(z, np.empty_like(z))
            derivs.append(self._act.deriv(z, a, z))
        y = a @ self.weights[-1].T
        y += self.biases[-1]
        return y, derivs

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, self.dtype)
        v = np.asarray(v, self.dtype)
        y, derivs = self._forward_storing(x)
        g = vectors_matmul(v, self.weights[-1])
        for w in reversed(self.weights[:-1]):
            g = scale_rows(g, derivs.pop())  # frees sigma'(z) of this layer
            g = vectors_matmul(g, w)
        return y, expand(g, x.shape[0])

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(x, self.dtype)
        t = np.asarray(t, self.dtype)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            z = a @ w.T
            z += b
            a = self._act.fn(z, np.empty_like(z))
            d = self._act.deriv(z, a, z)
            del z
            t = scale_rows(vectors_matmul(t, w.T), d)
            del d
        y = a @ self.weights[-1].T
        y += self.biases[-1]
        return y, expand(vectors_matmul(t, self.weights[-1].T), a.shape[0])

    # ---- cost model ----------------------------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """Peak live temporaries of the kernel, step by step, the worse of both vector layouts
        (per-sample contiguous or shared broadcast), plus the ufunc buffer allowance.
        Per-sample vectors that are not C-contiguous cost one extra copy (B*K*width)."""
        kernel = kernel_mode(mode, self.n_in, self.n_out)
        peak = self._vjp_peak if kernel == "vjp" else self._jvp_peak
        shared = (False, True) if batch > 1 else (False,)
        elements = max(peak(batch, k, s) for s in shared)
        return elements * self.dtype.itemsize + ufunc_buffer_bytes(self.dtype)

    def _vjp_peak(self, batch: int, k: int, shared: bool) -> int:
        """Elements live at the worst moment of vjp_batch (x, v, y and xbar not counted)."""
        h, layers, scratch = self.sizes, len(self.sizes) - 1, self._act.scratch
        peak = stored = 0  # stored: the sigma'(z) kept for the reverse sweep
        for i in range(layers - 1):
            a_in, z = (batch * h[i] if i else 0), batch * h[i + 1]
            # fn: a_in, z, a_out live; then deriv: z (becoming sigma'), a_out, its scratch
            peak = max(peak, stored + a_in + 2 * z, stored + (2 + scratch) * z)
            stored += z
        peak = max(peak, stored + (batch * h[-2] if layers > 1 else 0))  # last GEMM -> y
        if layers == 1:
            return max(peak, k * h[0] if shared else 0)
        # first reverse GEMM; shared vectors first give a (K, h) product, then expand
        peak = max(peak, stored + (k * h[-2] if shared else 0) + batch * k * h[-2])
        for i in range(layers - 2, -1, -1):
            stored -= batch * h[i + 1]  # sigma'(z_i) applied and released
            peak = max(peak, stored + batch * k * (h[i + 1] + (h[i] if i else 0)))
        return peak

    def _jvp_peak(self, batch: int, k: int, shared: bool) -> int:
        """Elements live at the worst moment of jvp_batch (x, t, y and ydot not counted)."""
        h, layers, scratch = self.sizes, len(self.sizes) - 1, self._act.scratch
        peak = 0
        for i in range(layers - 1):
            a_in, t_in = (batch * h[i], batch * k * h[i]) if i else (0, 0)
            z, tn = batch * h[i + 1], batch * k * h[i + 1]
            first = k * h[i + 1] if shared and i == 0 else 0
            # fn: a_in, t_in, z, a_out; deriv: t_in, z, a_out, scratch; tangent GEMM: + tn
            peak = max(
                peak,
                a_in + t_in + 2 * z,
                t_in + (2 + scratch) * z,
                t_in + 2 * z + first + tn,
            )
        if layers == 1:
            return k * h[1] if shared else 0
        return max(peak, batch * (k + 1) * h[-2])

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        """GEMMs (2 per multiply-add) plus bias, activation and derivative-scaling passes."""
        gemm = sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True))
        hidden = sum(self.sizes[1:-1])
        forward = 2 * gemm + sum(self.sizes[1:]) + self._act.flops * hidden
        return float(batch * forward + batch * k * (2 * gemm + hidden))
