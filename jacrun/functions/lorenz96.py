"""The ``lorenz96`` kind: the flow map of Lorenz-96 over ``steps`` classic RK4 steps.

dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, indices cyclic. f(x) is the state after
``steps`` steps of size ``dt``; its JVP is the tangent-linear model and its VJP the adjoint model
of 4D-Var data assimilation.

Cyclic shifts are slices of padded buffers, never copies: a state lives in a (B, n+3) buffer
holding [x_{n-2}, x_{n-1}, x_0 .. x_{n-1}, x_0] ("pad2"), so x_{i+1}, x_{i-2}, x_{i-1}, x_i are
the column slices [3:], [:n], [1:n+1], [2:n+2]. Read with an offset of one instead, the same
buffer holds x_{i-1} at [p - 1], which is what the adjoint needs.

With c_i = x_{i+1} - x_{i-2} the right-hand side and its derivatives are
- rhs: c_i x_{i-1} - x_i + F
- tangent: (d_{i+1} - d_{i-2}) x_{i-1} + c_i d_{i-1} - d_i
- adjoint: l_{i-1} x_{i-2} - l_{i+2} x_{i+1} + l_{i+1} c_{i+1} - l_i

One forward sweep serves all K vectors: the jvp propagates the (B, K, n) tangents stage by
stage beside the state; the vjp stores the four RK4 stage states of every step, then runs the
adjoint of each stage on all K cotangents in reverse. Only the time steps and stages loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
from numpy.typing import DTypeLike
from pydantic import Field, PositiveFloat

from jacrun.functions.base import Function, FunctionSpec, Mode
from jacrun.functions.linear import compute_dtype, kernel_mode, ufunc_buffer_bytes
from jacrun.functions.registry import register

StageHook = Callable[[int, int, np.ndarray, np.ndarray], None]
"""(step, stage, padded state sp (B, n+3), c (B, n+1)) -> None, called once per RK4 stage."""


class Lorenz96Spec(FunctionSpec):
    """Config of ``kind: lorenz96``."""

    kind: Literal["lorenz96"] = "lorenz96"
    dim: int = Field(ge=4, description="State size n = m (at least 4).")
    forcing: float = Field(8.0, description="The constant forcing F.")
    dt: PositiveFloat = Field(0.01, description="RK4 step size.")
    steps: int = Field(1, ge=1, description="Number of RK4 steps: f(x) = state at steps * dt.")


def _pad2(buf: np.ndarray, n: int) -> None:
    """Fill the cyclic pads of a (..., n+3) buffer whose columns 2..n+1 hold x_0..x_{n-1}."""
    buf[..., 0:2] = buf[..., n : n + 2]
    buf[..., n + 2] = buf[..., 2]


def _pad1(buf: np.ndarray, n: int) -> None:
    """Fill the cyclic pads of a (..., n+3) buffer whose columns 1..n hold l_0..l_{n-1}."""
    buf[..., 0] = buf[..., n]
    buf[..., n + 1 : n + 3] = buf[..., 1:3]


class _Tangents:
    """The (B, K, n) buffers of the tangent-linear model, advanced by the state sweep's hook."""

    def __init__(self, model: Lorenz96, t: np.ndarray) -> None:
        n = model.n_in
        self.model, self.n = model, n
        self.ds = np.empty((*t.shape[:2], n + 3), model.dtype)  # stage tangent, pad2 layout
        self.dk = np.empty(t.shape, model.dtype)  # tangent of k_j
        self.start = t  # tangent at the start of the step (t itself is never written)
        self.new = t  # its RK4 update: the result after the last step

    def stage(self, step: int, j: int, sp: np.ndarray, c: np.ndarray) -> None:
        n, ds, dk, model = self.n, self.ds, self.dk, self.model
        d_stage = ds[..., 2 : n + 2]
        if j == 0:
            self.start = self.new
            self.new = np.empty(dk.shape, model.dtype)
            d_stage[...] = self.start
            _pad2(ds, n)
        start, new = self.start, self.new
        # dk = (d_{i+1} - d_{i-2}) x_{i-1} - d_i + c_i d_{i-1}; ds is scratch afterwards
        np.subtract(ds[..., 3:], ds[..., :n], out=dk)
        dk *= sp[:, None, 1 : n + 1]
        dk -= d_stage
        left = ds[..., 1 : n + 1]
        np.multiply(left, c[:, None, :n], out=left)
        dk += left
        if j < 3:
            np.multiply(dk, model._offset[j], out=d_stage)
            d_stage += start
            _pad2(ds, n)
        if j == 0:
            np.multiply(dk, model._weight[0], out=new)
            new += start
        else:
            dk *= model._weight[j]
            new += dk


@register
class Lorenz96(Function):
    """State after ``steps`` RK4 steps of the Lorenz-96 system with forcing F."""

    kind: ClassVar[str] = "lorenz96"
    description: ClassVar[str] = (
        "Lorenz-96 flow map over RK4 steps; JVP = tangent-linear, VJP = adjoint model."
    )
    spec_model: ClassVar[type[FunctionSpec]] = Lorenz96Spec

    def __init__(
        self,
        dim: int,
        forcing: float = 8.0,
        dt: float = 0.01,
        steps: int = 1,
        dtype: DTypeLike = "float64",
    ) -> None:
        if dim < 4:
            raise ValueError(f"dim must be at least 4, got {dim}")
        if not (dt > 0 and np.isfinite(dt)):
            raise ValueError(f"dt must be positive, got {dt}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not np.isfinite(forcing):
            raise ValueError(f"forcing must be finite, got {forcing}")
        self.dtype = compute_dtype(dtype)
        self.n_in = self.n_out = dim
        self.forcing, self.dt, self.steps = float(forcing), float(dt), int(steps)
        self._offset = (dt / 2, dt / 2, dt)  # stage j+1 = x + offset[j] * k_j
        self._weight = (dt / 6, dt / 3, dt / 3, dt / 6)  # x_new = x + sum weight[j] * k_j

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> Lorenz96:
        assert isinstance(spec, Lorenz96Spec)
        return cls(spec.dim, spec.forcing, spec.dt, spec.steps, spec.dtype)

    def __repr__(self) -> str:
        return (
            f"Lorenz96(dim={self.n_in}, forcing={self.forcing}, dt={self.dt}, "
            f"steps={self.steps}, dtype={self.dtype})"
        )

    # ---- the state sweep -----------------------------------------------------------------------

    def _prepare(self, sp: np.ndarray, c: np.ndarray) -> None:
        """Pad the state in ``sp`` and set c[:, :n] = x_{i+1} - x_{i-2}, c[:, n] = c[:, 0]."""
        n = self.n_in
        _pad2(sp, n)
        np.subtract(sp[:, 3:], sp[:, :n], out=c[:, :n])
        c[:, n] = c[:, 0]

    def _sweep(self, x: np.ndarray, hook: StageHook | None = None) -> np.ndarray:
        """RK4-integrate the batch of states x (B, n), calling ``hook`` at every stage."""
        n, batch = self.n_in, x.shape[0]
        sp = np.empty((batch, n + 3), self.dtype)
        c = np.empty((batch, n + 1), self.dtype)
        k = np.empty((batch, n), self.dtype)
        stage = sp[:, 2 : n + 2]
        for step in range(self.steps):
            new = np.empty((batch, n), self.dtype)
            stage[...] = x
            for j in range(4):
                self._prepare(sp, c)
                if hook is not None:
                    hook(step, j, sp, c)
                np.multiply(c[:, :n], sp[:, 1 : n + 1], out=k)
                k -= stage
                k += self.forcing
                if j < 3:
                    np.multiply(k, self._offset[j], out=stage)
                    stage += x
                if j == 0:
                    np.multiply(k, self._weight[0], out=new)
                    new += x
                else:
                    k *= self._weight[j]
                    new += k
            x = new
        return x

    # ---- kernels -------------------------------------------------------------------------------

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        return self._sweep(np.asarray(x, self.dtype))

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tangent-linear model: the K tangents ride along the state sweep, stage by stage."""
        x = np.asarray(x, self.dtype)
        tangents = _Tangents(self, np.asarray(t, self.dtype))
        y = self._sweep(x, tangents.stage)
        return y, tangents.new

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Adjoint model: store the stage states, then run each stage's adjoint in reverse."""
        x = np.asarray(x, self.dtype)
        v = np.asarray(v, self.dtype)
        n, batch = self.n_in, x.shape[0]
        stages = np.empty((self.steps, 4, batch, n), self.dtype)

        def store(step: int, j: int, sp: np.ndarray, c: np.ndarray) -> None:
            stages[step, j] = sp[:, 2 : n + 2]

        y = self._sweep(x, store)

        sp = np.empty((batch, n + 3), self.dtype)
        c = np.empty((batch, n + 1), self.dtype)
        kbar = np.empty((*v.shape[:2], n + 3), self.dtype)  # cotangent of k_j, padded (pad1)
        sbar = np.empty(v.shape, self.dtype)  # cotangent of stage state j
        lam = kbar[..., 1 : n + 1]
        end = v  # cotangent of the state at the end of the step
        for step in reversed(range(self.steps)):
            start = np.empty(v.shape, self.dtype)  # cotangent of the state at the step start
            for j in (3, 2, 1, 0):
                # kbar_j = weight_j end + offset_j sbar_{j+1} (sbar already scaled by offset_j)
                np.multiply(end, self._weight[j], out=lam)
                if j < 3:
                    lam += sbar
                _pad1(kbar, n)
                sp[:, 2 : n + 2] = stages[step, j]
                self._prepare(sp, c)
                self._adjoint_rhs(sp, c, kbar, sbar)
                if j == 3:
                    np.add(end, sbar, out=start)
                else:
                    start += sbar
                if j:
                    sbar *= self._offset[j - 1]
            end = start
        return y, end

    def _adjoint_rhs(self, sp: np.ndarray, c: np.ndarray, kbar: np.ndarray, out: np.ndarray) -> None:
        """out_i = l_{i-1} x_{i-2} - l_{i+2} x_{i+1} + l_{i+1} c_{i+1} - l_i; clobbers kbar."""
        n = self.n_in
        np.multiply(kbar[..., 2 : n + 2], c[:, None, 1 : n + 1], out=out)
        out -= kbar[..., 1 : n + 1]
        kbar *= sp[:, None, :]  # column p: l_{p-1} x_{p-2}, both cyclic (pad1 / pad2 layouts)
        out += kbar[..., 0:n]
        out -= kbar[..., 3 : n + 3]

    # ---- cost model ----------------------------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """Padded state, c, k and up to two step states; K-vector buffers likewise; for the
        vjp also the stored stages, steps * 4 * batch * dim; plus the ufunc buffer allowance."""
        n, steps = self.n_in, self.steps
        carried = min(steps - 1, 2)  # step-start / step-end arrays that are not the result
        state = batch * ((n + 3) + (n + 1) + n * (1 + carried))
        vectors = batch * k * ((n + 3) + n * (1 + carried))
        if kernel_mode(mode, n, n) == "jvp":
            elements = state + vectors
        else:
            stored = steps * 4 * batch * n
            elements = stored + max(state, batch * ((n + 3) + (n + 1)) + vectors)
        return elements * self.dtype.itemsize + ufunc_buffer_bytes(self.dtype)

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        """Per element and RK4 stage: 8 state operations and 9 per vector; the adjoint adds
        one state operation (c is recomputed in the reverse sweep)."""
        state = 8 if kernel_mode(mode, self.n_in, self.n_out) == "jvp" else 9
        return float(4 * self.steps * batch * self.n_in * (state + 9 * k))
