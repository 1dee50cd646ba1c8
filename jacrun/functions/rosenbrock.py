"""The ``rosenbrock`` kind: the extended Rosenbrock residuals, m = n = dim (even).

With 0-based pairs (u_i, w_i) = (x_{2i}, x_{2i+1}): f_{2i} = 10 (w_i - u_i^2), f_{2i+1} = 1 - u_i.
The Jacobian is block diagonal with 2x2 blocks [[-20 u_i, 10], [-1, 0]], so both products are a
few strided ufunc passes written straight into the result.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from numpy.typing import DTypeLike
from pydantic import Field, PositiveInt, field_validator

from jacrun.functions.base import Function, FunctionSpec, Mode
from jacrun.functions.linear import compute_dtype, ufunc_buffer_bytes
from jacrun.functions.registry import register


class RosenbrockSpec(FunctionSpec):
    """Config of ``kind: rosenbrock``."""

    kind: Literal["rosenbrock"] = "rosenbrock"
    dim: PositiveInt = Field(description="n = m, even.")

    @field_validator("dim")
    @classmethod
    def _even(cls, dim: int) -> int:
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        return dim


@register
class Rosenbrock(Function):
    """Extended Rosenbrock residuals f: R^n -> R^n."""

    kind: ClassVar[str] = "rosenbrock"
    description: ClassVar[str] = (
        "Extended Rosenbrock residuals 10 (x_2i - x_2i-1^2), 1 - x_2i-1 (dim even, m = n)."
    )
    spec_model: ClassVar[type[FunctionSpec]] = RosenbrockSpec

    def __init__(self, dim: int, dtype: DTypeLike = "float64") -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be even and positive, got {dim}")
        self.dtype = compute_dtype(dtype)
        self.n_in = self.n_out = dim

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> Rosenbrock:
        assert isinstance(spec, RosenbrockSpec)
        return cls(spec.dim, spec.dtype)

    def __repr__(self) -> str:
        return f"Rosenbrock(dim={self.n_in}, dtype={self.dtype})"

    def sparsity(self):
        """2x2 diagonal blocks: row 2i has columns 2i and 2i+1, row 2i+1 column 2i."""
        import scipy.sparse as sp

        pairs = np.arange(0, self.n_in, 2)
        rows = np.concatenate([pairs, pairs, pairs + 1])
        cols = np.concatenate([pairs, pairs + 1, pairs])
        shape = (self.n_out, self.n_in)
        return sp.csr_array((np.ones(rows.size, dtype=bool), (rows, cols)), shape=shape)

    # ---- kernels -------------------------------------------------------------------------------

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, self.dtype)
        u, w = x[:, 0::2], x[:, 1::2]
        y = np.empty_like(x, order="C")
        even = y[:, 0::2]
        np.multiply(u, u, out=even)
        np.subtract(w, even, out=even)
        even *= 10
        np.subtract(1, u, out=y[:, 1::2])
        return y

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """xbar_{2i} = -20 u_i v_{2i} - v_{2i+1}, xbar_{2i+1} = 10 v_{2i}."""
        x = np.asarray(x, self.dtype)
        v = np.asarray(v, self.dtype)
        slope = np.multiply(x[:, None, 0::2], -20)  # (B, 1, n/2): the only temporary
        xbar = np.empty(v.shape[:2] + (self.n_in,), self.dtype)
        even = xbar[..., 0::2]
        np.multiply(v[..., 0::2], slope, out=even)
        even -= v[..., 1::2]
        np.multiply(v[..., 0::2], 10, out=xbar[..., 1::2])
        return self.forward_batch(x), xbar

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ydot_{2i} = 10 t_{2i+1} - 20 u_i t_{2i}, ydot_{2i+1} = -t_{2i}."""
        x = np.asarray(x, self.dtype)
        t = np.asarray(t, self.dtype)
        slope = np.multiply(x[:, None, 0::2], -20)
        ydot = np.empty(t.shape[:2] + (self.n_out,), self.dtype)
        even, odd = ydot[..., 0::2], ydot[..., 1::2]
        np.multiply(t[..., 0::2], slope, out=even)
        np.multiply(t[..., 1::2], 10, out=odd)  # odd is scratch until the last line
        even += odd
        np.negative(t[..., 0::2], out=odd)
        return self.forward_batch(x), ydot

    # ---- cost model ----------------------------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """One (B, n/2) array of slopes -20 u_i, plus the ufunc buffer allowance."""
        slopes = batch * (self.n_in // 2) * self.dtype.itemsize
        return slopes + ufunc_buffer_bytes(self.dtype)

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        pairs = self.n_in // 2
        return float(batch * pairs * (4 + 1) + batch * k * pairs * 4)
