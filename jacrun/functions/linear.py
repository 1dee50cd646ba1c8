"""The ``linear`` kind, y = A x + b, and the vector-batch matrix products the dense kernels share.

A vector batch (B, K, p) is either per-sample (contiguous: one GEMM on its (B*K, p) view) or
shared, a read-only broadcast view with stride 0 over samples (one small (K, p) GEMM, copied
to every sample of the result). Neither path writes into the vectors. Kernels that need work
buffers keep them in a :class:`Workspace`, reused from call to call.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from numpy.typing import ArrayLike, DTypeLike
from pydantic import Field, PositiveInt, model_validator

from jacrun.functions.base import Function, FunctionSpec, Mode, resolve_strategy
from jacrun.functions.registry import register
from jacrun.paths import InputPath

# ---- helpers shared by the dense kernels ---------------------------------------------------


def compute_dtype(dtype: DTypeLike) -> np.dtype:
    """The compute dtype, float32 or float64."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def kernel_mode(mode: Mode, n_in: int, n_out: int) -> Literal["vjp", "jvp"]:
    """The kernel a mode runs; ``jacobian`` follows the ``auto`` strategy (rev -> vjp)."""
    if mode == "jacobian":
        return "vjp" if resolve_strategy("auto", n_in, n_out) == "rev" else "jvp"
    return mode


def is_shared(v: np.ndarray) -> bool:
    """True for a vector batch broadcast over samples (stride 0 on the sample axis)."""
    return v.shape[0] > 1 and v.strides[0] == 0


def vectors_times(v: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (B, K, q) = v (B, K, p) @ w (p, q) as one GEMM on the (B*K, p) view; for shared
    vectors one (K, p) @ (p, q) product, copied to every sample. Never writes into ``v``."""
    batch, k, p = v.shape
    if is_shared(v):
        np.matmul(v[0], w, out=out[0])
        out[1:] = out[0]
    elif batch:
        np.matmul(v.reshape(batch * k, p), w, out=out.reshape(batch * k, -1))
    return out


class Workspace:
    """A kernel's work buffers, allocated on first use and reused by the calls that follow.

    ``get(tag, sizes, dtype, slot)`` returns flat 1-D buffers of at least ``sizes[name]`` elements
    (callers view the first elements). The buffers of one ``tag`` and ``slot`` are kept per
    calling thread, so two threads running the same Function never share one (a kernel that
    splits its rows over kernel threads fetches one slot per kernel thread before it starts
    them), and only for the last request: a request
    the cached buffers cannot hold, or one less than half their total, frees them first and
    allocates exactly what it asks. Arrays a kernel returns must never be these buffers (the
    next call overwrites them). Pickling drops the buffers (a worker allocates its own).
    """

    __slots__ = ("_local",)

    def __init__(self) -> None:
        self._local = threading.local()

    def __reduce__(self) -> tuple[type[Workspace], tuple[()]]:
        return (Workspace, ())

    def get(self, tag: str, sizes: dict[str, int], dtype: np.dtype, slot: int = 0) -> dict[str, np.ndarray]:
        """``slot``: one set of buffers per kernel thread of this call (see ``parallel``)."""
        if not sizes:
            return {}
        cache: dict[tuple[str, int], dict[str, np.ndarray]] | None = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = {}
        key = (tag, slot)
        held = cache.get(key)
        if held is not None:
            fits = all(name in held and held[name].size >= size for name, size in sizes.items())
            total = sum(buf.size for buf in held.values())
            same = all(buf.dtype == dtype for buf in held.values())
            if fits and same and 2 * sum(sizes.values()) >= total:
                return held
            del cache[key], held  # free before allocating the replacement
        buffers = {name: np.empty(size, dtype) for name, size in sizes.items()}
        cache[key] = buffers
        return buffers

    def slots(
        self, tag: str, sizes: dict[str, int], dtype: np.dtype, threads: int
    ) -> list[dict[str, np.ndarray]]:
        """One set of ``sizes`` buffers per kernel thread (slots 0 .. threads-1), see :meth:`get`."""
        return [self.get(tag, sizes, dtype, slot) for slot in range(threads)]

    def nbytes(self) -> int:
        """Bytes of the buffers this thread holds."""
        cache = getattr(self._local, "cache", {})
        return sum(buf.nbytes for held in cache.values() for buf in held.values())

    def clear(self) -> None:
        """Free this thread's buffers."""
        self._local.cache = {}


def view(buffer: np.ndarray, *shape: int) -> np.ndarray:
    """The first prod(shape) elements of a flat work buffer, as a C-contiguous array."""
    return buffer[: math.prod(shape)].reshape(shape)


def ufunc_buffer_bytes(dtype: np.dtype) -> int:
    """Allowance for NumPy's ufunc iterator buffers: a ufunc over broadcast or strided operands
    may buffer each of its (up to three) operands in chunks of ``np.getbufsize()`` elements.
    It is a constant, added once to every kernel's count of array temporaries."""
    return 3 * np.getbufsize() * dtype.itemsize


def load_npy(path: Path, what: str) -> np.ndarray:
    """Load one .npy array (no pickles), refusing archives and non-finite values."""
    arr = np.load(path, allow_pickle=False)
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{what} {path} must be a .npy array, not an .npz archive")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} {path} must hold finite numbers")
    return arr


def _draw(n_in: int, n_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A ~ N(0, 1/n_in), b ~ N(0, 0.1^2), in that order from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
    return a, 0.1 * rng.standard_normal(n_out)


# ---- the linear kind -------------------------------------------------------------------------


class LinearSpec(FunctionSpec):
    """Config of ``kind: linear``: a matrix file, or a random matrix drawn from ``seed``."""

    kind: Literal["linear"] = "linear"
    matrix: InputPath | None = Field(
        None, description="A as a .npy file of shape (m, n); n_in and n_out follow from it."
    )
    bias: InputPath | None = Field(
        None, description="b as a .npy file of shape (m,); else zero (matrix) or drawn (seed)."
    )
    seed: int = Field(0, description="Without matrix: draws A ~ N(0, 1/n_in) and b ~ N(0, 0.01).")
    n_in: PositiveInt | None = Field(None, description="Input size n (without matrix).")
    n_out: PositiveInt | None = Field(None, description="Output size m (without matrix).")

    @model_validator(mode="after")
    def _consistent(self) -> LinearSpec:
        if self.matrix is not None:
            clash = [k for k in ("n_in", "n_out", "seed") if k in self.model_fields_set]
            if clash:
                raise ValueError(
                    f"{' and '.join(clash)} cannot be combined with matrix "
                    "(the matrix file fixes the shape and values)"
                )
        elif self.n_in is None or self.n_out is None:
            raise ValueError("linear needs matrix: file.npy, or both n_in and n_out (with seed)")
        return self


@register
class Linear(Function):
    """y = A x + b with A of shape (m, n); J(x) = A exactly."""

    kind: ClassVar[str] = "linear"
    description: ClassVar[str] = "Affine map y = A x + b (A from a .npy file or drawn); J = A."
    spec_model: ClassVar[type[FunctionSpec]] = LinearSpec

    def __init__(
        self, matrix: ArrayLike, bias: ArrayLike | None = None, dtype: DTypeLike = "float64"
    ) -> None:
        self.dtype = compute_dtype(dtype)
        a = np.array(matrix, dtype=self.dtype, order="C")
        if a.ndim != 2 or 0 in a.shape:
            raise ValueError(f"matrix must be a non-empty 2-D array (m, n), got shape {a.shape}")
        self.n_out, self.n_in = a.shape
        b = np.zeros(self.n_out, self.dtype) if bias is None else np.array(bias, self.dtype)
        if b.shape != (self.n_out,):
            raise ValueError(f"bias must have shape ({self.n_out},), got {b.shape}")
        a.setflags(write=False)
        b.setflags(write=False)
        self.matrix, self.bias = a, b

    @classmethod
    def random(cls, n_in: int, n_out: int, seed: int = 0, dtype: DTypeLike = "float64") -> Linear:
        """A ~ N(0, 1/n_in), b ~ N(0, 0.1^2), both from ``np.random.default_rng(seed)``."""
        return cls(*_draw(n_in, n_out, seed), dtype)

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> Linear:
        assert isinstance(spec, LinearSpec)
        if spec.matrix is None:
            assert spec.n_in is not None and spec.n_out is not None
            matrix, bias = _draw(spec.n_in, spec.n_out, spec.seed)
        else:
            matrix, bias = load_npy(spec.matrix, "matrix"), None
        if spec.bias is not None:
            bias = load_npy(spec.bias, "bias")
        return cls(matrix, bias, spec.dtype)

    def sparsity(self):
        """The nonzeros of A."""
        import scipy.sparse as sp

        return sp.csr_array(self.matrix != 0)

    # ---- kernels -------------------------------------------------------------------------------

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, self.dtype) @ self.matrix.T
        y += self.bias
        return y

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = np.asarray(v, self.dtype)
        xbar = np.empty((*v.shape[:2], self.n_in), self.dtype)
        return self.forward_batch(x), vectors_times(v, self.matrix, xbar)

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(t, self.dtype)
        ydot = np.empty((*t.shape[:2], self.n_out), self.dtype)
        return self.forward_batch(x), vectors_times(t, self.matrix.T, ydot)

    # ---- cost model ----------------------------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """No temporaries: every product is written into the result (the ufunc allowance only).
        Per-sample vectors that are not C-contiguous cost one extra copy (B*K*width)."""
        return ufunc_buffer_bytes(self.dtype)

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        mn = self.n_out * self.n_in
        return float(batch * (2 * mn + self.n_out) + 2 * batch * k * mn)
