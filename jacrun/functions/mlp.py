"""The ``mlp`` kind: a dense network with one activation between layers (none after the last).

Layer i maps a -> W_i a + b_i with W_i of shape (out_i, in_i), the layout of
``torch.nn.Linear.weight``, so a PyTorch state dict exports directly to the weights file.

Kernels fold the K vectors into the GEMM row dimension: a (B, K, h) vector batch is viewed as
(B*K, h) and each layer costs one GEMM (``np.matmul(..., out=...)`` into a work buffer) plus
one broadcast multiply by the activation derivative sigma'(z) (B, h), which a single forward
pass computes for all K vectors.
- vjp: forward pass storing sigma'(z) per hidden layer, then the reverse sweep.
- jvp: tangents travel with the forward pass; nothing is stored.
- shared vectors (a broadcast (K, d) batch, such as the basis of a Jacobian): the first product
  is one small (K, d) GEMM, multiplied straight into the per-sample buffer by sigma'(z).

The batch runs in chunks of about ``GEMM_ROWS`` GEMM rows (samples x vectors), so the work
buffers are bounded whatever the batch, and the buffers (see :class:`Workspace`) are allocated
once and reused by every later call of the same shape. Bias, activation and derivative run in
L2-sized row blocks (``BLOCK_ELEMENTS``), one pass over memory instead of four. The returned
arrays are always fresh, written by the last GEMMs directly.
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
    Workspace,
    compute_dtype,
    is_shared,
    kernel_mode,
    ufunc_buffer_bytes,
    vectors_times,
    view,
)
from jacrun.functions.parallel import for_row_ranges, one_blas_thread, split
from jacrun.functions.registry import register
from jacrun.paths import InputPath

GEMM_ROWS = 4096
"""Rows (samples x vectors) of the GEMMs of one chunk: large enough for BLAS peak, small enough
that the work buffers of a chunk stay within a few tens of MB (see ``BUFFER_ELEMENTS``)."""
BUFFER_ELEMENTS = 1 << 22
"""Cap on GEMM_ROWS x the widest hidden layer (not below 256 rows)."""
BLOCK_ELEMENTS = 1 << 16
"""Elements of one row block of the bias/activation/derivative chain (256-512 KiB: L2)."""


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
        self._work = Workspace()

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

    def sparsity(self) -> Literal["dense"]:
        """Dense: every output depends on every input through the first layer."""
        return "dense"

    # ---- kernels -------------------------------------------------------------------------------

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, self.dtype)
        batch = x.shape[0]
        y = np.empty((batch, self.n_out), self.dtype)
        if batch == 0:
            return y
        hidden = self.sizes[1:-1]

        threads, span = self._split(batch, 1)
        slots = self._slots("forward", threads, span, 1)

        def chunk(start: int, stop: int, slot: int) -> None:
            buf = slots[slot]
            a = x[start:stop]
            for i, h in enumerate(hidden):
                z = view(buf["z"], stop - start, h)
                np.matmul(a, self.weights[i].T, out=z)
                a = view(buf["a"], stop - start, h)
                self._activate(z, self.biases[i], a, derivative=False)
            self._output(a, y[start:stop])

        for_row_ranges(batch, threads, span, chunk)
        return y

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, self.dtype)
        v = np.asarray(v, self.dtype)
        batch, k = v.shape[:2]
        sizes, weights, layers = self.sizes, self.weights, len(self.weights)
        hidden, n, m = sizes[1:-1], self.n_in, self.n_out
        y = np.empty((batch, m), self.dtype)
        xbar = np.empty((batch, k, n), self.dtype)
        if batch == 0:
            return y, xbar
        if layers == 1:
            self._output(x, y)
            vectors_times(v, weights[0], xbar)
            return y, xbar
        first = self._shared_product("vjp", v)

        threads, span = self._split(batch, k)
        slots = self._slots("vjp", threads, span, k)

        def chunk(start: int, stop: int, slot: int) -> None:
            buf = slots[slot]
            r = stop - start
            # forward, storing sigma'(z_i) in d{i}; the activations pass through buffer p
            a = x[start:stop]
            for i, h in enumerate(hidden):
                z = view(buf[f"d{i}"], r, h)
                np.matmul(a, weights[i].T, out=z)
                a = view(buf["p"], r, h)
                self._activate(z, self.biases[i], a, derivative=True)
            self._output(a, y[start:stop])
            # reverse sweep: g = cotangent of z_j, in buffers q, p, q, ... (p's activations are dead)
            g = view(buf["q"], r, k, hidden[-1])
            d = view(buf[f"d{layers - 2}"], r, hidden[-1])[:, None, :]
            if first is not None:
                np.multiply(d, first[None], out=g)  # this operand order: 2.7x faster on two threads
            else:
                np.matmul(v[start:stop].reshape(r * k, m), weights[-1], out=g.reshape(r * k, -1))
                g *= d
            for j in range(layers - 3, -1, -1):
                gn = view(buf["pq"[(layers - 3 - j) % 2]], r, k, hidden[j])
                np.matmul(g.reshape(r * k, -1), weights[j + 1], out=gn.reshape(r * k, -1))
                gn *= view(buf[f"d{j}"], r, hidden[j])[:, None, :]
                g = gn
            np.matmul(g.reshape(r * k, -1), weights[0], out=xbar[start:stop].reshape(r * k, n))

        for_row_ranges(batch, threads, span, chunk)
        return y, xbar

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, self.dtype)
        t = np.asarray(t, self.dtype)
        batch, k = t.shape[:2]
        sizes, weights, layers = self.sizes, self.weights, len(self.weights)
        hidden, n, m = sizes[1:-1], self.n_in, self.n_out
        y = np.empty((batch, m), self.dtype)
        ydot = np.empty((batch, k, m), self.dtype)
        if batch == 0:
            return y, ydot
        if layers == 1:
            self._output(x, y)
            vectors_times(t, weights[0].T, ydot)
            return y, ydot
        first = self._shared_product("jvp", t)

        threads, span = self._split(batch, k)
        slots = self._slots("jvp", threads, span, k)

        def chunk(start: int, stop: int, slot: int) -> None:
            buf = slots[slot]
            r = stop - start
            a = x[start:stop]
            tangent = None if first is not None else t[start:stop].reshape(r * k, n)
            for i, h in enumerate(hidden):
                z = view(buf["z"], r, h)
                np.matmul(a, weights[i].T, out=z)
                a = view(buf["a"], r, h)
                self._activate(z, self.biases[i], a, derivative=True)
                tn = view(buf[("t1", "t2")[i % 2]], r, k, h)
                if tangent is None:
                    np.multiply(z[:, None, :], first[None], out=tn)  # see vjp_batch
                else:
                    np.matmul(tangent, weights[i].T, out=tn.reshape(r * k, h))
                    tn *= z[:, None, :]
                tangent = tn.reshape(r * k, h)
            self._output(a, y[start:stop])
            np.matmul(tangent, weights[-1].T, out=ydot[start:stop].reshape(r * k, m))

        for_row_ranges(batch, threads, span, chunk)
        return y, ydot

    def _output(self, a: np.ndarray, y: np.ndarray) -> None:
        """y = a W_last^T + b_last, written into ``y``."""
        np.matmul(a, self.weights[-1].T, out=y)
        y += self.biases[-1]

    def _activate(self, z: np.ndarray, b: np.ndarray, a: np.ndarray, derivative: bool) -> None:
        """z += b; a = sigma(z); then z = sigma'(z) when ``derivative``. In row blocks of about
        BLOCK_ELEMENTS, so the later steps read the block from cache, not memory."""
        fn, deriv = self._act.fn, self._act.deriv
        step = max(1, BLOCK_ELEMENTS // z.shape[1])
        for start in range(0, z.shape[0], step):
            zb, ab = z[start : start + step], a[start : start + step]
            np.add(zb, b, out=zb)
            fn(zb, ab)
            if derivative:
                deriv(zb, ab, zb)

    def _chunk_rows(self, batch: int, k: int) -> int:
        """Samples per chunk: about GEMM_ROWS GEMM rows, at least one sample."""
        widest = max(self.sizes[1:-1], default=1)
        gemm_rows = max(256, min(GEMM_ROWS, BUFFER_ELEMENTS // widest))
        return max(1, min(batch, -(-gemm_rows // k)))

    def _buffer_sizes(self, kernel: str, rows: int, k: int) -> dict[str, int]:
        """Elements of each work buffer of ``kernel`` (forward, vjp, jvp) for a chunk of ``rows``
        (per kernel thread; the shared vectors' (K, h) product is :meth:`_shared_elements`)."""
        hidden, layers = self.sizes[1:-1], len(self.weights)
        if layers == 1:
            return {}
        widest = max(hidden)
        if kernel == "forward":
            return {"z": rows * widest, "a": rows * widest}
        if kernel == "vjp":
            sizes = {f"d{i}": rows * h for i, h in enumerate(hidden)}
            # q holds the cotangents of z_{L-2}, z_{L-4}, ...; p the activations, then z_{L-3}, ...
            in_q = hidden[::-1][0::2]
            in_p = hidden[::-1][1::2]
            sizes["q"] = rows * k * max(in_q)
            sizes["p"] = max(rows * widest, rows * k * max(in_p, default=0))
            return sizes
        sizes = {"z": rows * widest, "a": rows * widest, "t1": rows * k * max(hidden[0::2])}
        if len(hidden) > 1:
            sizes["t2"] = rows * k * max(hidden[1::2])
        return sizes

    def _shared_matrix(self, kernel: str) -> np.ndarray:
        """The matrix shared vectors meet first: W_last (vjp) or W_0^T (jvp)."""
        return self.weights[-1] if kernel == "vjp" else self.weights[0].T

    def _shared_product(self, kernel: str, vectors: np.ndarray) -> np.ndarray | None:
        """For shared vectors, the one (K, h) product every sample uses, in a work buffer
        (computed on one BLAS thread, see ``parallel.one_blas_thread``); else None."""
        if not is_shared(vectors):
            return None
        w = self._shared_matrix(kernel)
        k, h = vectors.shape[1], w.shape[1]
        first = view(self._work.get(f"{kernel}-shared", {"s": k * h}, self.dtype)["s"], k, h)
        with one_blas_thread():
            np.matmul(vectors[0], w, out=first)
        return first

    def _shared_elements(self, kernel: str, k: int) -> int:
        """The (K, h) product that shared vectors compute once per call (vjp, jvp)."""
        if len(self.weights) == 1 or kernel == "forward":
            return 0
        return k * self._shared_matrix(kernel).shape[1]

    def _split(self, batch: int, k: int) -> tuple[int, int]:
        """(kernel threads, rows per range) for this batch (see ``parallel.split``)."""
        return split(batch, self._chunk_rows(batch, k), self._min_rows(k))

    def _slots(self, kernel: str, threads: int, span: int, k: int) -> list[dict[str, np.ndarray]]:
        """One set of work buffers per kernel thread, each for ranges of ``span`` rows."""
        return self._work.slots(kernel, self._buffer_sizes(kernel, span, k), self.dtype, threads)

    def _min_rows(self, k: int) -> int:
        """Fewest samples worth a kernel thread: ranges of at least 256 GEMM rows and 64K
        elements of the widest layer, so BLAS stays efficient and threads pay off."""
        widest = max(self.sizes[1:-1], default=1)
        return max(1, -(-max(256, (1 << 16) // widest) // k))

    def _scratch_elements(self, rows: int) -> int:
        """Temporaries of the derivative (gelu) in one row block of ``_activate``."""
        if not self._act.scratch:
            return 0
        block = max(min(rows, max(1, BLOCK_ELEMENTS // h)) * h for h in self.sizes[1:-1])
        return self._act.scratch * block

    # ---- cost model ----------------------------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """The work buffers of one range of rows (see ``_buffer_sizes``), the derivative's
        scratch in one row block and the ufunc buffer allowance, once per kernel thread (see
        :func:`~jacrun.functions.parallel.split`: T threads run ranges 1/T as long), plus the
        shared vectors' (K, h) product. The buffers stay allocated for the next call.
        Per-sample vectors that are not C-contiguous cost one extra copy (chunk rows*K*width)."""
        kernel = kernel_mode(mode, self.n_in, self.n_out)
        threads, span = self._split(batch, k)
        per_thread = sum(self._buffer_sizes(kernel, span, k).values())
        if len(self.weights) > 1:
            per_thread += self._scratch_elements(span)
        shared = self._shared_elements(kernel, k) if batch > 1 else 0
        itemsize = self.dtype.itemsize
        return threads * (per_thread * itemsize + ufunc_buffer_bytes(self.dtype)) + shared * itemsize

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        """GEMMs (2 per multiply-add) plus bias, activation and derivative-scaling passes."""
        gemm = sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True))
        hidden = sum(self.sizes[1:-1])
        forward = 2 * gemm + sum(self.sizes[1:]) + self._act.flops * hidden
        return float(batch * forward + batch * k * (2 * gemm + hidden))
