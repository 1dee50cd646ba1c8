"""``autodiff: fd``: finite differences and the complex step of a plain NumPy function.

For functions with no derivatives at all (a legacy simulator, SciPy's ODE solvers and
interpolators): every product comes from evaluations of f at perturbed points, evaluated for
all samples and directions of a block together, in calls of about ``fd.call_memory`` (1 MiB) of
perturbed points and outputs: a ``batched: true`` f (B, n) -> (B, m) is called on many perturbed
rows at once (the fast path); a per-sample f is called once per perturbed row (the slow path).

Methods, for a direction d with step h:

- ``forward``: (f(x + h d) - f(x)) / h, one evaluation per direction, error O(h) + eps / h;
- ``central``: (f(x + h d) - f(x - h d)) / 2h, two, error O(h^2) + eps / h;
- ``complex``: Im f(x + i h d) / h, one, error O(h^2) with no cancellation, so exact to
  rounding at a tiny h, for an f written with complex-safe operations (refused at build time
  when f returns real values for complex inputs, raises on them, or disagrees with central
  differences at a probe point).

Steps. ``step: auto`` takes the relative step r = sqrt(eps) (forward), eps**(1/3) (central) or
eps (complex), eps of the compute dtype; a number replaces r. Along input j the step is
h_j = r max(1, |x_j|), signed as x_j for forward differences (as SciPy's
``approx_derivative``); the step actually taken is the rounded (x_j + h_j) - x_j. Jacobian
columns and the seeds of a colouring perturb each input j by its own h_j and divide each
nonzero J_ij by the h_j of its column. A general tangent t, moving q inputs, gets one scalar
step h = r max(1, |x * t| / |t|) sqrt(q) / |t| (signed as <x, t> for forward differences): the
inputs that h t moves move by r max(1, |x * t| / |t|) in root mean square, the relative step
applied to the size of x where t points, as each input of a column or seed does. (With the
length of h t instead set to that, a random tangent of n = 4,096 inputs moved each input by
1/64 of it and lost a factor of 10-30 in accuracy to rounding.) For t = e_j, h is exactly h_j,
so a unit tangent and a Jacobian column are the same number. The difference is divided by the
step taken along t after rounding, <x + h t - x, t> / <t, t>.

Bounds. ``fd.bounds: [lower, upper]`` is f's domain: x must lie inside it (``jacrun validate``
checks the first input rows, every block checks its own), and no evaluation leaves it. Near a
bound a forward step turns around; a central difference becomes the one-sided second-order
(-3 f(x) + 4 f(x + h d) - f(x + 2h d)) / 2h away from the bound, with h shrunk to fit when
neither side has room (SciPy's rules). Along a tangent the room is the largest s with
x +- s t inside the bounds. The complex step never leaves the real domain.

Modes. ``jvp_batch``: the tangents are the directions. ``sparse_nonzeros``: the colouring's
seeds are the directions (per-input steps), the differences are gathered into the nonzeros
and divided by their column's step. ``vjp_batch`` goes through the Jacobian: one direction per
input (or per colour, when f declares its pattern), then v^T J; its cost does not depend on the
number of cotangents. Hence ``reverse = False``: Jacobians are computed column-wise.

f's pattern may be declared on the callable (``f.sparsity``: a scipy.sparse matrix (m, n) or a
function returning one), as ``n_in`` may: ``sparsity: auto`` then uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from jacrun.functions.adapters import (
    AutodiffFunction,
    no_width_hint,
    numpy_factory_dtype,
    weights_unsupported,
)
from jacrun.functions.base import Mode
from jacrun.functions.parallel import for_row_ranges, kernel_threads, split
from jacrun.functions.targets import TargetError

if TYPE_CHECKING:
    from jacrun.functions.python import PythonSpec
    from jacrun.sparsity import SparseJacobian

Method = Literal["forward", "central", "complex"]

TARGET_CLASSES: tuple[type, ...] = ()
CALL_MEMORY = 1 << 20
"""Default ``fd.call_memory``: perturbed points and outputs per call of f, so that a NumPy
function's temporaries stay near a core's L2 cache (1 MiB here). On the 9-point stencil
(docs/performance.md, "Finite differences") calls of 4 to 32 MiB ran 10-20% slower at n = 1,024
and 4,096; calls of 256 or 512 KiB as fast at n = 1,024 and 12-15% slower at n = 4,096, where
they split one sample's 9 directions over two or three calls."""
POINTS = {"forward": 1, "central": 2, "complex": 1}
"""Evaluations of f per direction."""
LARGE_N = 64
"""``jacrun plan`` suggests a sparsity pattern for a Jacobian of more inputs than this."""
COMPLEX_AGREEMENT = {"float64": 1e-5, "float32": 1e-2}
"""The complex step must agree with central differences this closely at the build's probe."""

# the backend hooks the adapter package looks up
factory_dtype = numpy_factory_dtype
prepare = weights_unsupported
default_width = no_width_hint


def setup(*, dtype: np.dtype, threads: int | None) -> None:
    """Nothing to set: f runs NumPy, under the process's BLAS settings."""


def adapter_options(spec: PythonSpec) -> dict[str, Any]:
    """The section's ``fd`` options as keyword arguments of :class:`FDFunction`."""
    fd = spec.fd
    if fd is None:
        return {}
    return {"method": fd.method, "step": fd.step, "bounds": fd.bounds, "call_memory": int(fd.call_memory)}


def relative_step(method: Method, dtype: np.dtype, step: float | str = "auto") -> float:
    """r: ``step``, or sqrt(eps), eps**(1/3) or eps of ``dtype`` for forward, central, complex."""
    if step != "auto":
        return float(step)
    eps = float(np.finfo(dtype).eps)
    return {"forward": eps**0.5, "central": eps ** (1 / 3), "complex": eps}[method]


# ---- bounds -------------------------------------------------------------------------------------


def bound_array(side: float | list[float | None] | None, none: float) -> np.ndarray:
    """One side of ``fd.bounds`` as float64 values, 1-D (length 1 for one number); null is ``none``."""
    values = side if isinstance(side, list) else [side]
    return np.array([none if v is None else v for v in values], dtype=np.float64)


@dataclass(frozen=True)
class Bounds:
    """f's domain, lower <= x <= upper per input (float64, length n; +-inf where unbounded)."""

    lower: np.ndarray
    upper: np.ndarray

    @classmethod
    def of(cls, sides: tuple[Any, Any], n: int) -> Bounds:
        """From ``fd.bounds`` (each side a number, n numbers or None); TargetError naming the
        key when a side has neither 1 nor n values."""
        arrays = []
        for name, side, none in (("lower", sides[0], -np.inf), ("upper", sides[1], np.inf)):
            values = bound_array(side, none)
            if values.size not in (1, n):
                raise TargetError(
                    f"fd.bounds: the {name} bounds have {values.size} values, but f has n = {n} "
                    "inputs; give one number for every input, or n numbers"
                )
            arrays.append(np.broadcast_to(values, (n,)).copy())
        return cls(*arrays)

    def outside(self, x: np.ndarray) -> tuple[int, int] | None:
        """(row, input) of the first entry of x outside the bounds, or None."""
        bad = (x < self.lower) | (x > self.upper)
        if not bad.any():
            return None
        i, j = np.argwhere(bad)[0]
        return int(i), int(j)

    def room(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How far each input may move down and up: (x - lower, upper - x), float64."""
        x = np.asarray(x, dtype=np.float64)
        return x - self.lower, self.upper - x

    def room_along(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The largest s >= 0 with x - s t (below) and x + s t (above) inside the bounds, per
        direction: x (b, n), t (b, k, n) -> (b, k) each; inf where t moves no bounded input."""
        down, up = self.room(x)
        down, up = down[:, None, :], up[:, None, :]
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            above = np.where(t > 0, up / t, np.where(t < 0, down / -t, np.inf))
            below = np.where(t > 0, down / t, np.where(t < 0, up / -t, np.inf))
        return np.nan_to_num(below, nan=np.inf).min(axis=-1), np.nan_to_num(above, nan=np.inf).min(axis=-1)

    def clip(self, points: np.ndarray) -> np.ndarray:
        """``points`` moved inside the bounds, in place (rounding can step out by an ulp)."""
        return np.clip(points, self.lower, self.upper, out=points)

    def summary(self) -> str:
        bounded = int(np.count_nonzero(np.isfinite(self.lower) | np.isfinite(self.upper)))
        return f"{bounded} of {self.lower.size} inputs bounded"


def fit_to_bounds(
    h: np.ndarray, below: np.ndarray, above: np.ndarray, two_sided: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Steps that keep every evaluation inside the bounds, and where a central difference
    turns one-sided (SciPy's rules for ``approx_derivative``).

    ``h`` is the wanted step (signed for one-sided differences, positive for central ones);
    ``below`` and ``above`` the room down and up. One-sided: a step that leaves the domain
    turns around when the other side has room, else becomes the larger room. Central, which
    needs h on both sides: where one side lacks room, the one-sided second-order formula
    (points x + h, x + 2h) towards the larger room, with h at most half of it; and where that
    h would be no larger than the smaller room, central with the smaller room as h.
    """
    h = np.array(h, dtype=np.float64)
    one_sided = np.zeros(h.shape, dtype=bool)
    if not two_sided:
        leaves = (h > above) | (-h > below)
        fits = np.abs(h) <= np.maximum(below, above)
        h = np.where(leaves & fits, -h, h)
        up = (above >= below) & ~fits
        h = np.where(up, above, np.where((above < below) & ~fits, -below, h))
        return h, one_sided
    central = (below >= h) & (above >= h)
    up = (above >= below) & ~central
    down = (above < below) & ~central
    h = np.where(up, np.minimum(h, 0.5 * above), np.where(down, -np.minimum(h, 0.5 * below), h))
    one_sided = up | down
    smaller = np.minimum(below, above)
    back = ~central & (np.abs(h) <= smaller)
    return np.where(back, smaller, h), one_sided & ~back


# ---- the adapter --------------------------------------------------------------------------------


class FDFunction(AutodiffFunction):
    """Kernels from evaluations of f at perturbed points, batched over samples and directions."""

    backend = "fd"
    reverse = False

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        method: Method = "forward",
        step: float | str = "auto",
        bounds: tuple[Any, Any] | None = None,
        call_memory: int = CALL_MEMORY,
        **options: Any,
    ) -> None:
        self.method: Method = method
        self.step = step
        self.bounds_setting = bounds
        self.call_memory = int(call_memory)
        super().__init__(fn, **options)

    def _compile(self) -> None:
        self._f = self._vector_fn()
        self.rel = relative_step(self.method, self.dtype, self.step)
        self.bounds = None if self.bounds_setting is None else Bounds.of(self.bounds_setting, self.n_in)
        self.__dict__.pop("declared", None)

    @property
    def points(self) -> int:
        """Evaluations of f per direction."""
        return POINTS[self.method]

    def with_method(self, method: Method, step: float | str = "auto") -> FDFunction:
        """The same f, bounds and sizes, differenced by ``method`` with ``step``."""
        return type(self)(
            self.fn,
            method=method,
            step=step,
            bounds=self.bounds_setting,
            call_memory=self.call_memory,
            n_in=self.n_in,
            n_out=self.n_out,
            dtype=self.dtype,
            batched=self.batched,
            scalar=self.scalar,
            target=self.target,
            width=self.width,
        )

    # ---- structure, domain, cost ----------------------------------------------------------------

    def sparsity(self):
        """The pattern declared on the callable (``f.sparsity``: a matrix, or a function
        returning one), else None."""
        declared = getattr(self.fn, "sparsity", None)
        return declared() if callable(declared) else declared

    @cached_property
    def declared(self) -> SparseJacobian | None:
        """The column colouring of the declared pattern (``vjp_batch`` uses its seeds), or None."""
        from jacrun.sparsity import SparseJacobian, as_pattern

        pattern = self.sparsity()
        if pattern is None:
            return None
        return SparseJacobian.from_pattern(as_pattern(pattern, (self.n_out, self.n_in)), "fwd")

    def probe_inputs(self, rows: int, seed: int | None) -> np.ndarray:
        """The build's probe rows, inside ``fd.bounds`` when f has them."""
        if self.bounds is None:
            return super().probe_inputs(rows, seed)
        if seed is None:
            return (
                np.clip(np.zeros(self.n_in), self.bounds.lower, self.bounds.upper)[None]
                .repeat(rows, 0)
                .astype(self.dtype)
            )
        return probe_rows(self, rows, seed)

    def check_inputs(self, x: np.ndarray) -> None:
        if self.bounds is None:
            return
        bad = self.bounds.outside(x)
        if bad is not None:
            i, j = bad
            raise ValueError(
                f"fd.bounds: sample {i} has x[{j}] = {x[i, j]:g}, outside the bounds "
                f"[{self.bounds.lower[j]:g}, {self.bounds.upper[j]:g}] of input {j}"
            )

    def _row_bytes(self) -> int:
        """Bytes of one perturbed row and its output."""
        return (self.n_in + self.n_out) * self.dtype.itemsize * (2 if self.method == "complex" else 1)

    def spans(self, batch: int, directions: int) -> tuple[int, int]:
        """(samples, directions) per call of f: all directions of as many samples as fit in
        ``call_memory`` (with f(x) of each), or, when one sample's do not fit, some directions of
        one sample; never less than one of each."""
        rows = max(1, self.call_memory // self._row_bytes())
        per_sample = 1 + directions * self.points
        if per_sample <= rows:
            return max(1, min(batch, rows // per_sample)), directions
        return 1, max(1, min(directions, (rows - 1) // self.points))

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """One call's perturbed points and outputs per kernel thread (and three times that for
        f's own temporaries and the differences), plus the steps of every sample."""
        directions = k if mode == "jvp" else self._jacobian_directions()
        samples, per_call = self.spans(batch, directions)
        call = samples * (1 + per_call * self.points) * self._row_bytes()
        threads = kernel_threads() if self.batched else 1
        steps = batch * (3 * self.n_in + 4 * k) * 8
        columns = 0 if mode == "jvp" else samples * per_call * self.n_out * self.dtype.itemsize
        if mode == "vjp" and self.declared is not None:  # _vjp_sparse: a range's nonzeros and sums
            sparse = self.declared
            rows = min(batch, self._vjp_rows(k, sparse.nnz))
            sums = rows * ((1 + 2 * k) * sparse.nnz + k * self.n_in) * 8
            return steps + sums + sparse.work_bytes(self, rows)
        return threads * (4 * call + columns) + steps

    def _jacobian_directions(self) -> int:
        declared = self.declared
        return self.n_in if declared is None else declared.n_colours

    def plan_notes(self, mode: Mode, sparse: SparseJacobian | None) -> tuple[str, ...]:
        notes = []
        p = self.points
        if not self.batched:
            notes.append(
                "function: f is called once per perturbed sample (batched: false), the slow path of "
                "autodiff: fd; write f for a batch, (B, n) -> (B, m) with independent rows, and set "
                "batched: true"
            )
        if mode == "vjp":
            directions = self._jacobian_directions()
            what = (
                f"n = {self.n_in} directions"
                if self.declared is None
                else (f"{directions} directions (the colours of f's declared pattern)")
            )
            note = (
                f"mode vjp with autodiff: fd goes through each sample's Jacobian: {what}, "
                f"{directions * p} evaluations of f per sample besides f(x), whatever the number of "
                "cotangents"
            )
            if self.declared is None and self.n_in > LARGE_N:
                note += (
                    "; mode: jacobian with a sparsity pattern (sparsity: {file: pattern.npz}, or "
                    "f.sparsity) takes one direction per colour and stores J, from which any v^T J follows"
                )
            notes.append(note)
        if mode == "jacobian" and sparse is None and self.n_in > LARGE_N:
            notes.append(
                f"a dense fd Jacobian takes n = {self.n_in} directions per sample "
                f"({self.n_in * p} evaluations of f); with a sparsity pattern (sparsity: "
                "{file: pattern.npz}, or f.sparsity) it takes one per colour"
            )
        return tuple(notes)

    def attributes(self) -> dict:
        rule = {
            "forward": "h_j = r max(1, |x_j|) sign(x_j)",
            "central": "h_j = r max(1, |x_j|) on both sides",
            "complex": "imaginary h_j = r max(1, |x_j|)",
        }[self.method]
        auto = {"forward": "sqrt(eps)", "central": "eps**(1/3)", "complex": "eps"}[self.method]
        steps = (
            f"{rule} for input j (Jacobian columns, colours' seeds); along a tangent t moving q "
            "inputs one step h = r max(1, |x * t| / |t|) sqrt(q) / |t|"
            + (", signed as <x, t>" if self.method == "forward" else "")
            + f"; r = {self.rel:.3g}"
        )
        if self.bounds is not None and self.method != "complex":
            steps += "; steps stay within fd.bounds" + (
                ", one-sided (x + h, x + 2h) where one side lacks room" if self.method == "central" else ""
            )
        fd = {
            "method": self.method,
            "step": self.step,
            "relative_step": self.rel,
            "steps": steps,
            "evaluations_per_direction": self.points,
            "bounds": "none" if self.bounds is None else self.bounds.summary(),
            "call_memory": self.call_memory,
            "batched": self.batched,
        }
        step = f"{auto} = {self.rel:.3g}" if self.step == "auto" else f"{self.rel:.3g}"
        summary = (
            f"finite differences ({self.method}): relative step {step}, {self.points} evaluation(s) "
            f"of f per direction, " + ("batched f" if self.batched else "f per sample (slow path)")
        )
        return {"fd": fd, "summary": summary}

    # ---- evaluating f ---------------------------------------------------------------------------

    def _evaluate(self, points: np.ndarray) -> np.ndarray:
        """f on rows (r, n): one call of a batched f, else one call per row (the slow path)."""
        if self.batched:
            return np.asarray(self._f(points))
        return np.stack([np.asarray(self._f(row)) for row in points])

    def _call(self, points: np.ndarray) -> np.ndarray:
        """f on rows (r, n) -> (r, m), its shape checked (and complex for complex inputs)."""
        out = self._evaluate(points)
        rows = points.shape[0]
        if out.shape != (rows, self.n_out):
            raise ValueError(f"f of {rows} rows returned shape {out.shape}, expected {(rows, self.n_out)}")
        if np.iscomplexobj(points) and not np.iscomplexobj(out):
            raise ValueError(
                f"f returns {out.dtype} values for {points.dtype} inputs: it drops the imaginary part"
            )
        return out

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._evaluate(x))

    def _with_outputs(self, x: np.ndarray, points: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """f at ``points`` (r, n); with ``y`` (b, m) given, also f(x) into it, in the same call
        when both are real."""
        if y is None:
            return self._call(points)
        if np.iscomplexobj(points):
            y[...] = self._call(x)
            return self._call(points)
        values = self._call(np.concatenate([x, points]))
        y[...] = values[: x.shape[0]]
        return values[x.shape[0] :]

    def _each_range(self, batch: int, samples: int, body: Callable[[int, int], None]) -> None:
        """``body(start, stop)`` over ranges of at most ``samples`` rows, on the kernel threads
        (a batched f; a per-sample f is a Python loop, on this thread)."""
        threads, span = split(batch, samples) if self.batched else (1, samples)
        for_row_ranges(batch, threads, span, lambda start, stop, slot: body(start, stop))

    # ---- steps ----------------------------------------------------------------------------------

    def input_steps(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per input j of each row: (h, the step taken, one_sided), each (b, n).

        h_j = r max(1, |x_j|) (signed as x_j, forward), fitted to the bounds. The step taken is
        what the difference divides by: (x + h) - x after rounding (forward), (x + h) - (x - h)
        (central), (x + 2h) - x (one-sided central), h (complex)."""
        h = self.rel * np.maximum(1, np.abs(x))
        if self.method == "forward":
            h = np.where(x >= 0, h, -h)
        one_sided = np.zeros(x.shape, dtype=bool)
        if self.bounds is not None and self.method != "complex":
            below, above = self.bounds.room(x)
            h, one_sided = fit_to_bounds(h, below, above, self.method == "central")
            h = h.astype(self.dtype)
        if self.method == "complex":
            return h, h, one_sided
        low, high = self._offsets(h, one_sided)
        base = x if self.method == "forward" else np.where(one_sided, x, self._inside(x + low))
        return h, self._inside(x + high) - base, one_sided

    def _offsets(self, h: np.ndarray, one_sided: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two offsets of a central difference: (-h, h), or (h, 2h) where one-sided; a
        forward difference's one offset is the second."""
        if self.method == "forward":
            return h, h
        return np.where(one_sided, h, -h), np.where(one_sided, 2 * h, h)

    def _inside(self, points: np.ndarray) -> np.ndarray:
        return points if self.bounds is None else self.bounds.clip(points)

    def tangent_steps(
        self, x: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One scalar step per tangent, x (b, n), t (b, k, n) -> (h, one_sided, <t, t>, shrunk),
        each (b, k): h = r max(1, |x * t| / |t|) sqrt(q) / |t|, q the inputs t moves (signed as
        <x, t>, forward), fitted to the room along t; ``shrunk`` where the bounds left less room
        than that. A zero tangent gets h = 0 (its product is zero)."""
        xs = x[:, None, :]
        tt = np.einsum("bkn,bkn->bk", t, t)
        norm = np.sqrt(tt)
        weighted = np.sqrt(np.einsum("bkn,bkn->bk", xs * t, xs * t))
        zero = norm == 0
        safe = np.where(zero, 1, norm)
        moved = np.sqrt(np.count_nonzero(t, axis=-1))
        h = self.rel * np.maximum(1, weighted / safe) * (moved / safe)
        if self.method == "forward":
            h = np.where(np.einsum("bn,bkn->bk", x, t) >= 0, h, -h)
        one_sided = np.zeros(h.shape, dtype=bool)
        shrunk = np.zeros(h.shape, dtype=bool)
        if self.bounds is not None and self.method != "complex":
            below, above = self.bounds.room_along(x, t)
            fitted, one_sided = fit_to_bounds(h, below, above, self.method == "central")
            shrunk = np.abs(fitted) < np.abs(h)
            h = fitted
        return np.where(zero, 0, h).astype(self.dtype), one_sided, tt, shrunk & ~zero

    # ---- products ------------------------------------------------------------------------------

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """J t per tangent: one scalar step along each, P evaluations of f per tangent."""
        self.check_inputs(x)
        batch, k = t.shape[:2]
        y = np.empty((batch, self.n_out), dtype=self.dtype)
        ydot = np.empty((batch, k, self.n_out), dtype=self.dtype)
        samples, per_call = self.spans(batch, k)

        def body(a: int, b: int) -> None:
            for k0 in range(0, k, per_call):
                k1 = min(k, k0 + per_call)
                ydot[a:b, k0:k1] = self._tangent_products(x[a:b], t[a:b, k0:k1], y[a:b], k0 == 0)

        self._each_range(batch, samples, body)
        return y, ydot

    def _tangent_products(
        self, x: np.ndarray, t: np.ndarray, y: np.ndarray, first: bool, split: bool = True
    ) -> np.ndarray:
        """J t (b, k, m) for tangents t (b, k, n); f(x) into ``y`` when ``first``, else read
        from it. A tangent whose step the bounds shrank (x near a corner of the box, where t
        points out of it both ways) is split in two, J t = J t_up - J (-t_down), each part
        moving its inputs towards their larger room."""
        b, k, n = t.shape
        h, one_sided, tt, shrunk = self.tangent_steps(x, t)
        xs, steps = x[:, None, :], h[:, :, None] * t
        if self.method == "complex":
            values = self._with_outputs(x, (xs + 1j * steps).reshape(-1, n), y if first else None)
            return values.imag.reshape(b, k, -1) / np.where(h == 0, 1, h)[:, :, None]
        low, high = self._offsets(h[:, :, None], one_sided[:, :, None])
        upper = self._inside(xs + high * t)
        if self.method == "forward":
            points, base = upper, xs
        else:
            lower = self._inside(xs + low * t)
            points = np.stack([lower, upper], axis=2)
            base = np.where(one_sided[:, :, None], xs, lower)
        with np.errstate(invalid="ignore", divide="ignore"):
            taken = np.einsum("bkn,bkn->bk", upper - base, t) / np.where(tt == 0, 1, tt)
        values = self._with_outputs(x, points.reshape(-1, n), y if first else None)
        values = values.reshape(b, k, self.points, -1)
        f0 = y[:, None, :]
        if self.method == "forward":
            diff = values[:, :, 0] - f0
        else:
            f1, f2 = values[:, :, 0], values[:, :, 1]
            diff = np.where(one_sided[:, :, None], one_sided_difference(f0, f1, f2), f2 - f1)
        result = diff / np.where(taken == 0, 1, taken)[:, :, None]
        if split and shrunk.any():
            rows, cols = np.nonzero(shrunk)
            parts = self._split(x[rows], t[rows, cols])
            both = np.flatnonzero(parts.any(axis=2).all(axis=1))  # one empty part: nothing to gain
            if both.size:
                rows, cols, parts = rows[both], cols[both], parts[both]
                products = self._tangent_products(x[rows], parts, y[rows], False, split=False)
                result[rows, cols] = products[:, 0] - products[:, 1]
        return result

    def _split(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(r, 2, n): t_up, the inputs of t (r, n) that move towards their larger room along +t,
        and -t_down, the others, negated (so they too have room along +); t = t_up + t_down."""
        below, above = self.bounds.room(x)
        up = ((t > 0) & (above >= below)) | ((t < 0) & (below > above))
        return np.stack([np.where(up, t, 0), -np.where(up, 0, t)], axis=1).astype(self.dtype)

    def _seed_values(
        self,
        x: np.ndarray,
        h: np.ndarray,
        one_sided: np.ndarray,
        seeds: np.ndarray,
        y: np.ndarray | None,
        per_call: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """f at x perturbed along each seed (c, n) by the per-input steps: (b, c, m) for the
        upper points (the imaginary part for complex) and, central, the lower ones (else None);
        the seeds in calls of ``per_call`` (default all). With ``y`` given, f(x) goes into it."""
        c = seeds.shape[0]
        per_call = per_call or c
        if per_call >= c:
            return self._seed_call(x, h, one_sided, seeds, y)
        parts = [
            self._seed_call(x, h, one_sided, seeds[c0 : c0 + per_call], y if c0 == 0 else None)
            for c0 in range(0, c, per_call)
        ]
        upper = np.concatenate([part[0] for part in parts], axis=1)
        lower = None if parts[0][1] is None else np.concatenate([part[1] for part in parts], axis=1)
        return upper, lower

    def _seed_call(
        self, x: np.ndarray, h: np.ndarray, one_sided: np.ndarray, seeds: np.ndarray, y: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One call of f for :meth:`_seed_values`."""
        b, n = x.shape
        c = seeds.shape[0]
        xs = x[:, None, :]
        if self.method == "complex":
            values = self._with_outputs(x, (xs + 1j * (h[:, None, :] * seeds)).reshape(-1, n), y)
            return np.ascontiguousarray(values.imag.reshape(b, c, -1), dtype=self.dtype), None
        low, high = self._offsets(h, one_sided)
        upper = self._inside(xs + high[:, None, :] * seeds)
        if self.method == "forward":
            return self._with_outputs(x, upper.reshape(-1, n), y).reshape(b, c, -1), None
        lower = self._inside(xs + low[:, None, :] * seeds)
        values = self._with_outputs(x, np.stack([lower, upper], axis=2).reshape(-1, n), y)
        values = values.reshape(b, c, 2, -1)
        return values[:, :, 1], values[:, :, 0]

    def sparse_nonzeros(
        self, x: np.ndarray, sparse: SparseJacobian, out: np.ndarray, outputs: bool = True
    ) -> np.ndarray:
        """The nonzeros of J(x) from the colouring's seeds: per-input steps, each seed one
        direction, the differences gathered and divided by their column's step taken. f is
        called on all colours of as many samples as fit ``call_memory`` (or on some colours
        of one sample); the gather reads the differences of every colour at once."""
        if sparse.direction != "fwd":
            raise ValueError("finite differences colour columns (strategy fwd), not rows")
        self.check_inputs(x)
        batch = x.shape[0]
        y = np.empty((batch, self.n_out), dtype=self.dtype)
        h, taken, one_sided = self.input_steps(x)
        seeds = sparse._seeds(self.dtype)
        samples, per_call = self.spans(batch, sparse.n_colours)
        for a in range(0, batch, samples):  # SparseJacobian.evaluate runs this on the kernel threads
            rows = slice(a, min(batch, a + samples))
            upper, lower = self._seed_values(x[rows], h[rows], one_sided[rows], seeds, y[rows], per_call)
            self._combine(upper, lower, y[rows], taken[rows], one_sided[rows], sparse, out[rows])
        return y

    def _combine(
        self,
        upper: np.ndarray,
        lower: np.ndarray | None,
        y: np.ndarray,
        taken: np.ndarray,
        one_sided: np.ndarray,
        sparse: SparseJacobian,
        out: np.ndarray,
    ) -> None:
        """The nonzeros (b, nnz) into ``out`` from the seeds' values (b, C, m): gathered,
        combined by the method, divided by their column's step taken."""
        b = upper.shape[0]
        flat = lambda values: values.reshape(b, -1)  # noqa: E731
        index = sparse.index_map
        if self.method == "forward":
            np.subtract(upper, y[:, None, :], out=upper)
        if self.method != "central" or not one_sided.any():
            if self.method == "central":
                upper = upper - lower
            np.take(flat(upper), index, axis=1, out=out, mode="clip")  # straight into ``out``
        else:
            high, low = np.take(flat(upper), index, axis=1), np.take(flat(lower), index, axis=1)
            f0 = np.take(y, sparse.rows, axis=1)
            sided = np.take(one_sided, sparse.indices, axis=1)
            out[...] = np.where(sided, one_sided_difference(f0, low, high), high - low)
        np.divide(out, np.take(taken, sparse.indices, axis=1), out=out)

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """v^T J through each sample's Jacobian: its nonzeros from the declared pattern's
        colours, or its columns from one direction per input, then the products with v."""
        self.check_inputs(x)
        if self.declared is not None:
            return self._vjp_sparse(x, v, self.declared)
        batch, k = v.shape[:2]
        n = self.n_in
        y = np.empty((batch, self.n_out), dtype=self.dtype)
        xbar = np.empty((batch, k, n), dtype=self.dtype)
        samples, per_call = self.spans(batch, n)

        def body(a: int, b: int) -> None:
            h, taken, one_sided = self.input_steps(x[a:b])
            for j0 in range(0, n, per_call):
                j1 = min(n, j0 + per_call)
                columns = self._columns(x[a:b], h, taken, one_sided, y[a:b], j0, j1)  # (b, c, m)
                xbar[a:b, :, j0:j1] = np.matmul(v[a:b], columns.transpose(0, 2, 1))

        self._each_range(batch, samples, body)
        return y, xbar

    def _columns(
        self,
        x: np.ndarray,
        h: np.ndarray,
        taken: np.ndarray,
        one_sided: np.ndarray,
        y: np.ndarray,
        j0: int,
        j1: int,
    ) -> np.ndarray:
        """Columns j0:j1 of J(x), as (b, j1 - j0, m): one direction per input."""
        unit = np.zeros((j1 - j0, self.n_in), dtype=self.dtype)
        unit[np.arange(j1 - j0), np.arange(j0, j1)] = 1
        upper, lower = self._seed_values(x, h, one_sided, unit, y if j0 == 0 else None)
        f0 = y[:, None, :]
        if self.method == "forward":
            diff = upper - f0
        elif self.method == "central":
            diff = np.where(one_sided[:, j0:j1, None], one_sided_difference(f0, lower, upper), upper - lower)
        else:
            diff = upper
        return diff / taken[:, j0:j1, None]

    def _vjp_sparse(
        self, x: np.ndarray, v: np.ndarray, sparse: SparseJacobian
    ) -> tuple[np.ndarray, np.ndarray]:
        """v^T J from the nonzeros: for each column j, the sum of v_i J_ij over its nonzeros; in
        ranges of samples whose nonzeros and products fit about ``call_memory``."""
        batch, k = v.shape[:2]
        n = self.n_in
        y = np.empty((batch, self.n_out), dtype=self.dtype)
        xbar = np.empty((batch, k, n), dtype=self.dtype)
        span = self._vjp_rows(k, sparse.nnz)
        for a in range(0, batch, span):
            b = min(batch, a + span)
            y[a:b], values = sparse.evaluate(self, x[a:b])
            keys = (np.arange((b - a) * k)[:, None] * n + sparse.indices[None, :]).ravel()
            products = np.take(v[a:b], sparse.rows, axis=2) * values[:, None, :]  # (rows, K, nnz)
            sums = np.bincount(keys, weights=products.ravel(), minlength=(b - a) * k * n)
            xbar[a:b] = sums.reshape(b - a, k, n)
        return y, xbar

    def _vjp_rows(self, k: int, nnz: int) -> int:
        """Samples per range of :meth:`_vjp_sparse`: their nonzeros and products (K per
        nonzero, float64 sums) in about ``call_memory``."""
        return max(1, self.call_memory // ((1 + 2 * k) * nnz * 8))

    def jacobian(self, x: np.ndarray, strategy: Literal["rev", "fwd", "auto"] = "auto"):
        """Per-sample Jacobians, column-wise (there is no reverse mode to choose)."""
        return super().jacobian(x, "fwd" if strategy == "auto" else strategy)


Adapter = FDFunction


def one_sided_difference(f0: np.ndarray, f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """-3 f(x) + 4 f(x + h) - f(x + 2h), as 4 (f1 - f0) - (f2 - f0): exactly zero for the outputs
    that the step does not move (the expanded form leaves rounding noise there)."""
    return 4 * (f1 - f0) - (f2 - f0)


# ---- build-time probes --------------------------------------------------------------------------


def probe_rows(function: FDFunction, rows: int, seed: int) -> np.ndarray:
    """Points inside f's domain for probing: uniform in (0.5, 1.5), or inside the bounds."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.25, 0.75, (rows, function.n_in))
    x = 0.5 + 2 * u * np.ones(function.n_in)
    bounds = function.bounds
    if bounds is not None:
        lower, upper = bounds.lower, bounds.upper
        both = np.isfinite(lower) & np.isfinite(upper)
        x = np.where(both, lower + u * (upper - lower), x)
        x = np.where(~both & np.isfinite(lower), lower + 2 * u, x)
        x = np.where(~both & np.isfinite(upper), upper - 2 * u, x)
    return x.astype(function.dtype)


def complex_problem(function: FDFunction) -> str | None:
    """Why f does not allow the complex step (None when it does): it raises on complex inputs,
    returns real values for them, or Im f(x + i h t) / h disagrees with central differences at
    a probe point."""
    x = probe_rows(function, 2, 3)
    t = np.random.default_rng(4).standard_normal((2, 1, function.n_in)).astype(function.dtype)
    try:
        _, got = function.with_method("complex").jvp_batch(x, t)
    except Exception as exc:  # noqa: BLE001 - the user's f on complex inputs
        return f"f of complex inputs failed: {type(exc).__name__}: {exc}"
    _, expected = function.with_method("central").jvp_batch(x, t)
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(expected) & np.isfinite(got)
    if not finite.any():
        return None  # nothing to compare at the probe: leave it to `jacrun check`
    scale = max(float(np.abs(expected[finite]).max()), float(np.finfo(function.dtype).tiny))
    error = float(np.abs(got - expected)[finite].max()) / scale
    if error > COMPLEX_AGREEMENT[function.dtype.name]:
        return (
            f"Im f(x + i h t) / h differs from central differences by {error:.2g} (relative) at a "
            "probe point: f does not carry the imaginary part through (abs, np.real, comparisons, "
            "casts to real)"
        )
    return None


def probe_derivatives(function: FDFunction, target: str, label: str) -> None:
    """One JVP on two rows inside the domain (a VJP would cost n directions); the complex step
    checked against central differences; a declared pattern checked for its shape."""
    x = probe_rows(function, 2, 1)
    t = np.random.default_rng(2).standard_normal((2, 1, function.n_in)).astype(function.dtype)
    try:
        y, ydot = function.jvp_batch(x, t)
    except Exception as exc:
        if function.method == "complex":
            raise TargetError(
                f"fd.method: complex: target {target!r}: f of complex inputs failed: "
                f"{type(exc).__name__}: {exc}; use method: central or forward"
            ) from exc
        raise TargetError(
            f"target {target!r}: {label} cannot evaluate f at perturbed points: {type(exc).__name__}: {exc}"
        ) from exc
    if ydot.shape != (2, 1, function.n_out) or ydot.dtype != function.dtype:
        raise TargetError(
            f"target {target!r}: the jvp of f has shape {ydot.shape} ({ydot.dtype}), expected "
            f"{(2, 1, function.n_out)} ({function.dtype})"
        )
    if function.method == "complex":
        problem = complex_problem(function)
        if problem is not None:
            raise TargetError(
                f"fd.method: complex: target {target!r}: {problem}; use method: central or forward"
            )
    from jacrun.sparsity import as_pattern

    try:
        pattern = function.sparsity()
        if pattern is not None:
            as_pattern(pattern, (function.n_out, function.n_in))
    except Exception as exc:  # noqa: BLE001 - the user's attribute
        raise TargetError(f"target {target!r}: its declared sparsity (f.sparsity) {exc}") from None
