"""The ``lorenz96`` kind: the flow map of Lorenz-96 over ``steps`` classic RK4 steps.

dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, indices cyclic. f(x) is the state after
``steps`` steps of size ``dt``; its JVP is the tangent-linear model and its VJP the adjoint model
of 4D-Var data assimilation.

Layout: the kernels work on the transpose, component-major, so every stencil term is one
contiguous slice and every step one ufunc call over a whole chunk of samples. A state lives in
a (n+3, S) buffer (S samples of a chunk) whose rows hold [x_{n-2}, x_{n-1}, x_0 .. x_{n-1}, x_0]
("pad2"): x_{i+1}, x_{i-2}, x_{i-1}, x_i are the row slices [3:], [:n], [1:n+1], [2:n+2]. Read
with an offset of one instead ("pad1"), the same rows hold l_{i-1} at [p - 1], which is what
the adjoint needs. Vector batches are (n(+3), K, S): the state broadcasts over K.

With c_i = x_{i+1} - x_{i-2} the right-hand side and its derivatives are
- rhs: c_i x_{i-1} - x_i + F
- tangent: (d_{i+1} - d_{i-2}) x_{i-1} + c_i d_{i-1} - d_i
- adjoint: l_{i-1} x_{i-2} - l_{i+2} x_{i+1} + l_{i+1} c_{i+1} - l_i

One forward sweep serves all K vectors: the jvp propagates the tangents stage by stage beside
the state; the vjp stores the four padded RK4 stage states of every step, then runs the adjoint
of each stage on all K cotangents in reverse. The batch runs in chunks of samples sized so one
vector array is about ``CHUNK_BYTES`` (L2-resident); the stored stages are per chunk, so memory
does not grow with the batch. Every stage runs in place in work buffers (see
:class:`Workspace`) reused from call to call; only the time steps, stages and chunks loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from numpy.typing import DTypeLike
from pydantic import Field, PositiveFloat

from jacrun.functions.base import Function, FunctionSpec, Mode
from jacrun.functions.linear import Workspace, compute_dtype, kernel_mode, ufunc_buffer_bytes, view
from jacrun.functions.parallel import for_row_ranges, split
from jacrun.functions.registry import register

if TYPE_CHECKING:
    import scipy.sparse

CHUNK_BYTES = 256 * 1024
"""Target size of one (n+3, K, S) vector array of a chunk (S samples), so a stage's working
set stays in the L2 cache."""
MIN_CHUNK = 32
"""Fewest samples per chunk (many vectors per sample): below that, call overhead dominates."""


class Lorenz96Spec(FunctionSpec):
    """Config of ``kind: lorenz96``."""

    kind: Literal["lorenz96"] = "lorenz96"
    dim: int = Field(ge=4, description="State size n = m (at least 4).")
    forcing: float = Field(8.0, description="The constant forcing F.")
    dt: PositiveFloat = Field(0.01, description="RK4 step size.")
    steps: int = Field(1, ge=1, description="Number of RK4 steps: f(x) = state at steps * dt.")


def _pad2(buf: np.ndarray, n: int) -> None:
    """Fill the cyclic pad rows of a (n+3, ...) buffer whose rows 2..n+1 hold x_0..x_{n-1}."""
    buf[0:2] = buf[n : n + 2]
    buf[n + 2] = buf[2]


def _pad1(buf: np.ndarray, n: int) -> None:
    """Fill the cyclic pad rows of a (n+3, ...) buffer whose rows 1..n hold l_0..l_{n-1}."""
    buf[0] = buf[n]
    buf[n + 1 : n + 3] = buf[1:3]


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
        self._work = Workspace()

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> Lorenz96:
        assert isinstance(spec, Lorenz96Spec)
        return cls(spec.dim, spec.forcing, spec.dt, spec.steps, spec.dtype)

    def __repr__(self) -> str:
        return (
            f"Lorenz96(dim={self.n_in}, forcing={self.forcing}, dt={self.dt}, "
            f"steps={self.steps}, dtype={self.dtype})"
        )

    def sparsity(self) -> scipy.sparse.csr_array | Literal["dense"]:
        """The pattern of ``steps`` RK4 steps: each of the 4 stages of a step couples x_i to
        x_{i-2} .. x_{i+1}, so one step reaches x_{i-8} .. x_{i+4} (cyclic), S steps
        x_{i-8S} .. x_{i+4S}: a band that fills the whole matrix once 12 S + 1 >= n."""
        import scipy.sparse as sp

        n = self.n_in
        if 12 * self.steps + 1 >= n:
            return "dense"
        reach = {offset % n for offset in range(-8 * self.steps, 4 * self.steps + 1)}
        rows = np.repeat(np.arange(n), len(reach))
        cols = (rows.reshape(n, -1) + np.array(sorted(reach))).ravel() % n
        return sp.csr_array((np.ones(rows.size, dtype=bool), (rows, cols)), shape=(n, n))

    # ---- the state sweep -----------------------------------------------------------------------

    def _rhs(self, sp: np.ndarray, c: np.ndarray, k: np.ndarray) -> None:
        """Pad the stage state in ``sp`` (n+3, S); c[:n] = x_{i+1} - x_{i-2}; k = the rhs."""
        n = self.n_in
        _pad2(sp, n)
        np.subtract(sp[3:], sp[:n], out=c[:n])
        np.multiply(c[:n], sp[1 : n + 1], out=k)
        k -= sp[2 : n + 2]
        k += self.forcing

    def _stage_update(self, j: int, k: np.ndarray, x: np.ndarray, stage: np.ndarray, new: np.ndarray) -> None:
        """stage <- x + offset_j k (the next stage state, j < 3); new <- x + sum_j weight_j k_j."""
        if j < 3:
            np.multiply(k, self._offset[j], out=stage)
            stage += x
        if j == 0:
            np.multiply(k, self._weight[0], out=new)
            new += x
        else:
            k *= self._weight[j]
            new += k

    def _chunk(self, batch: int, k: int) -> int:
        """Samples per chunk: one (n+3, K, S) vector array of about CHUNK_BYTES."""
        per_sample = (self.n_in + 3) * k * self.dtype.itemsize
        return max(1, min(batch, max(MIN_CHUNK, CHUNK_BYTES // per_sample)))

    def _buffer_sizes(self, kernel: str, chunk: int, k: int) -> dict[str, int]:
        """Elements of each work buffer of ``kernel`` (forward, vjp, jvp) for ``chunk`` samples."""
        n, s = self.n_in, chunk
        if kernel == "vjp":
            state = {"stages": self.steps * 4 * (n + 3) * s, "k": n * s, "c": (n + 1) * s, "xa": n * s}
            vectors = {"e": n * k * s, "start": n * k * s, "kbar": (n + 3) * k * s, "sbar": n * k * s}
            return state | vectors
        state = {"sp": (n + 3) * s, "k": n * s, "c": (n + 1) * s, "xa": n * s, "xb": n * s}
        if kernel == "forward":
            return state
        vectors = {"ds": (n + 3) * k * s, "dk": n * k * s, "ta": n * k * s, "tb": n * k * s}
        return state | vectors

    def _split(self, batch: int, k: int) -> tuple[int, int]:
        """(kernel threads, samples per chunk): each thread runs whole chunks (``parallel.split``)."""
        chunk = self._chunk(batch, k)
        return split(batch, chunk, chunk)

    def _slots(self, kernel: str, threads: int, chunk: int, k: int) -> list[dict[str, np.ndarray]]:
        """One set of work buffers per kernel thread (each thread runs whole L2-sized chunks)."""
        return self._work.slots(kernel, self._buffer_sizes(kernel, chunk, k), self.dtype, threads)

    # ---- kernels -------------------------------------------------------------------------------

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, self.dtype)
        n, batch = self.n_in, x.shape[0]
        y = np.empty((batch, n), self.dtype)
        threads, chunk = self._split(batch, 1)
        slots = self._slots("forward", threads, chunk, 1)

        def run(a: int, b: int, slot: int) -> None:
            buf, s = slots[slot], b - a
            sp, k, c = view(buf["sp"], n + 3, s), view(buf["k"], n, s), view(buf["c"], n + 1, s)
            cur, nxt = view(buf["xa"], n, s), view(buf["xb"], n, s)
            np.copyto(cur, x[a:b].T)
            for _ in range(self.steps):
                sp[2 : n + 2] = cur
                for j in range(4):
                    self._rhs(sp, c, k)
                    self._stage_update(j, k, cur, sp[2 : n + 2], nxt)
                cur, nxt = nxt, cur
            np.copyto(y[a:b], cur.T)

        for_row_ranges(batch, threads, chunk, run)
        return y

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tangent-linear model: the K tangents ride along the state sweep, stage by stage."""
        x = np.asarray(x, self.dtype)
        t = np.asarray(t, self.dtype)
        n, (batch, kv) = self.n_in, t.shape[:2]
        y = np.empty((batch, n), self.dtype)
        ydot = np.empty((batch, kv, n), self.dtype)
        threads, chunk = self._split(batch, kv)
        slots = self._slots("jvp", threads, chunk, kv)

        def run(a: int, b: int, slot: int) -> None:
            buf, s = slots[slot], b - a
            sp, k, c = view(buf["sp"], n + 3, s), view(buf["k"], n, s), view(buf["c"], n + 1, s)
            cur, nxt = view(buf["xa"], n, s), view(buf["xb"], n, s)
            ds, dk = view(buf["ds"], n + 3, kv, s), view(buf["dk"], n, kv, s)
            tcur, tnxt = view(buf["ta"], n, kv, s), view(buf["tb"], n, kv, s)
            np.copyto(cur, x[a:b].T)
            np.copyto(tcur, t[a:b].transpose(2, 1, 0))
            d_stage, left = ds[2 : n + 2], ds[1 : n + 1]
            for _ in range(self.steps):
                sp[2 : n + 2] = cur
                d_stage[...] = tcur
                for j in range(4):
                    self._rhs(sp, c, k)
                    # dk = (d_{i+1} - d_{i-2}) x_{i-1} - d_i + c_i d_{i-1}; ds is scratch after
                    _pad2(ds, n)
                    np.subtract(ds[3:], ds[:n], out=dk)
                    dk *= sp[1 : n + 1, None, :]
                    dk -= d_stage
                    np.multiply(left, c[:n, None, :], out=left)
                    dk += left
                    self._stage_update(j, k, cur, sp[2 : n + 2], nxt)
                    self._stage_update(j, dk, tcur, d_stage, tnxt)
                cur, nxt = nxt, cur
                tcur, tnxt = tnxt, tcur
            np.copyto(y[a:b], cur.T)
            np.copyto(ydot[a:b], tcur.transpose(2, 1, 0))

        for_row_ranges(batch, threads, chunk, run)
        return y, ydot

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Adjoint model: store the padded stage states, then run each stage's adjoint in reverse."""
        x = np.asarray(x, self.dtype)
        v = np.asarray(v, self.dtype)
        n, steps, (batch, kv) = self.n_in, self.steps, v.shape[:2]
        y = np.empty((batch, n), self.dtype)
        xbar = np.empty((batch, kv, n), self.dtype)
        threads, chunk = self._split(batch, kv)
        slots = self._slots("vjp", threads, chunk, kv)

        def run(a: int, b: int, slot: int) -> None:
            buf, s = slots[slot], b - a
            stages = view(buf["stages"], steps, 4, n + 3, s)
            k, c, last = view(buf["k"], n, s), view(buf["c"], n + 1, s), view(buf["xa"], n, s)
            # forward: step i starts from the interior of stages[i, 0] and ends in stages[i + 1, 0]
            np.copyto(stages[0, 0, 2 : n + 2], x[a:b].T)
            for step in range(steps):
                cur = stages[step, 0, 2 : n + 2]
                nxt = stages[step + 1, 0, 2 : n + 2] if step + 1 < steps else last
                for j in range(4):
                    sp = stages[step, j]
                    self._rhs(sp, c, k)
                    following = stages[step, j + 1, 2 : n + 2] if j < 3 else None
                    self._stage_update(j, k, cur, following, nxt)
            np.copyto(y[a:b], last.T)
            # reverse: end = cotangent of the state at the end of the step
            end, start = view(buf["e"], n, kv, s), view(buf["start"], n, kv, s)
            kbar, sbar = view(buf["kbar"], n + 3, kv, s), view(buf["sbar"], n, kv, s)
            lam = kbar[1 : n + 1]  # cotangent of k_j, pad1 layout
            np.copyto(end, v[a:b].transpose(2, 1, 0))
            for step in reversed(range(steps)):
                for j in (3, 2, 1, 0):
                    # kbar_j = weight_j end + offset_j sbar_{j+1} (sbar already scaled by offset_j)
                    np.multiply(end, self._weight[j], out=lam)
                    if j < 3:
                        lam += sbar
                    _pad1(kbar, n)
                    sp = stages[step, j]  # padded by the forward sweep
                    np.subtract(sp[3:], sp[:n], out=c[:n])
                    c[n] = c[0]
                    self._adjoint_rhs(sp, c, kbar, sbar)
                    if j == 3:
                        np.add(end, sbar, out=start)
                    else:
                        start += sbar
                    if j:
                        sbar *= self._offset[j - 1]
                end, start = start, end
            np.copyto(xbar[a:b], end.transpose(2, 1, 0))

        for_row_ranges(batch, threads, chunk, run)
        return y, xbar

    def _adjoint_rhs(self, sp: np.ndarray, c: np.ndarray, kbar: np.ndarray, out: np.ndarray) -> None:
        """out_i = l_{i-1} x_{i-2} - l_{i+2} x_{i+1} + l_{i+1} c_{i+1} - l_i; clobbers kbar."""
        n = self.n_in
        np.multiply(kbar[2 : n + 2], c[1 : n + 1, None, :], out=out)
        out -= kbar[1 : n + 1]
        kbar *= sp[:, None, :]  # row p: l_{p-1} x_{p-2}, both cyclic (pad1 / pad2 layouts)
        out += kbar[0:n]
        out -= kbar[3 : n + 3]

    # ---- cost model ----------------------------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """The work buffers of one chunk of samples (see ``_buffer_sizes``): padded state, c,
        k and two step states, K-vector buffers likewise; for the vjp the stored padded stages,
        steps * 4 * (dim+3) * chunk, instead of the step states; plus the ufunc allowance; once
        per kernel thread (each runs whole chunks, see ``parallel.split``). They stay allocated
        for the next call."""
        kernel = kernel_mode(mode, self.n_in, self.n_out)
        threads, chunk = self._split(batch, k)
        elements = sum(self._buffer_sizes(kernel, chunk, k).values())
        return threads * (elements * self.dtype.itemsize + ufunc_buffer_bytes(self.dtype))

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        """Per element and RK4 stage: 8 state operations and 9 per vector; the adjoint adds
        one state operation (c is recomputed in the reverse sweep)."""
        state = 8 if kernel_mode(mode, self.n_in, self.n_out) == "jvp" else 9
        return float(4 * self.steps * batch * self.n_in * (state + 9 * k))
