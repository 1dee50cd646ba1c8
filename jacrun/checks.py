"""Gradient checks of a Function on a small batch, as one report.

The tests that PyTorch's ``gradcheck``, JAX's ``check_grads`` and the adjoint test of 4D-Var
perform, each a small function in the flat table :data:`CHECKS`:

==================  ===================================================================
shapes              forward/vjp/jvp return the documented shapes, the function's dtype,
                    finite values, and never write into their (read-only) inputs
consistency         the y of vjp and jvp equals forward(x); shared vectors given as a
                    read-only broadcast view give the results of a contiguous copy
finite_differences  central differences of forward against jvp on random tangents
dot_product         <v, J t> = <J^T v, t> per sample, random v and t (the adjoint test)
basis               J from vjp of the output basis against J from jvp of the input basis
row_independence    perturbing sample i of x changes only row i of forward(x)
==================  ===================================================================

A function differenced by ``autodiff: fd`` has no exact products to hold against finite
differences: its report compares the methods instead (``fd_forward``, ``fd_central`` and, where
f allows it, ``fd_complex``: each method's estimated relative error on a few Jacobian columns
and random tangents, against the complex step when f allows it, else against Richardson
extrapolation of central differences; the job's own method fails above its tolerance, the
others are shown for comparison), and the checks that compare products taken with different
steps (``dot_product``, ``sparse_jvp``) allow the job's method's tolerance.

Every check reports a relative error against a dtype-dependent tolerance (:data:`TOLERANCES`).
Errors are relative to the size of the compared quantity, or to its typical size over the
batch when that is larger, so that a sample whose Jacobian is nearly zero is judged against
the batch's scale rather than its own rounding noise. A deliberate 1 % error in a VJP or JVP
shows as a relative error of about 1e-2.

This module imports neither dask nor zarr.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table
from rich.text import Text

from jacrun.functions import Function, FunctionSpec, build_function, parse_spec

if TYPE_CHECKING:
    from jacrun.sparsity import SparseJacobian

TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {
        "shapes": 0.0,
        "consistency": 1e-10,
        "finite_differences": 1e-6,
        "dot_product": 1e-10,
        "basis": 1e-10,
        "row_independence": 1e-10,
        "sparse_jvp": 1e-10,
        "sparse_vjp": 1e-10,
        "sparse_dense": 1e-10,
        "fd_forward": 1e-5,
        "fd_central": 1e-7,
        "fd_complex": 1e-12,
    },
    "float32": {
        "shapes": 0.0,
        "consistency": 1e-4,
        "finite_differences": 1e-2,
        "dot_product": 1e-4,
        "basis": 1e-4,
        "row_independence": 1e-4,
        "sparse_jvp": 1e-4,
        "sparse_vjp": 1e-4,
        "sparse_dense": 1e-4,
        "fd_forward": 1e-2,
        "fd_central": 1e-3,
        "fd_complex": 1e-5,
    },
}
"""Default tolerance of each check per compute dtype; ``shapes`` counts problems (none allowed)."""

MAX_BASIS = 64
"""At most this many output rows and input columns of J are compared by ``basis``."""
FD_STEPS = 10.0 ** np.arange(1, -9, -1)
"""Finite-difference steps tried, in units of eps**(1/3) * (max|x| + 1)."""
MAX_ROWS = 8
"""At most this many samples are perturbed by ``row_independence``."""
FD_COLUMNS = 8
"""Jacobian columns (unit tangents) on which the fd method rows compare methods, with the
random tangents."""


@dataclass(frozen=True)
class CheckResult:
    """One row of a report: a check's relative error against its tolerance."""

    name: str
    error: float
    tolerance: float
    passed: bool
    detail: str = ""

    @property
    def ratio(self) -> float:
        """error / tolerance: above 1 fails."""
        if self.tolerance > 0:
            return self.error / self.tolerance if np.isfinite(self.error) else float("inf")
        return 0.0 if self.error == 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "error": _json_float(self.error),
            "tolerance": self.tolerance,
            "passed": self.passed,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class CheckReport:
    """The results of :func:`check` on one function in one dtype."""

    function: str
    dtype: str
    samples: int
    vectors: int
    seed: int
    rows: tuple[CheckResult, ...]
    label: str = ""
    """What was checked, e.g. ``float32`` or ``float64 recheck``; defaults to the dtype."""
    note: str = ""
    """Why a report has no rows (a recheck that could not be built)."""

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def worst(self) -> float:
        """The largest error / tolerance over the rows (0 without rows); above 1 fails."""
        return max((row.ratio for row in self.rows), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (non-finite numbers become None), for the store's attributes."""
        return {
            "label": self.label or self.dtype,
            "function": self.function,
            "dtype": self.dtype,
            "samples": self.samples,
            "vectors": self.vectors,
            "seed": self.seed,
            "passed": self.passed,
            "worst": _json_float(self.worst),
            "note": self.note,
            "checks": [row.to_dict() for row in self.rows],
        }

    def table(self) -> Table:
        """A rich table: check, relative error, tolerance, pass/FAIL, detail."""
        verdict = "[green]passed[/]" if self.passed else "[bold red]FAILED[/]"
        table = Table(
            title=f"{self.label or self.dtype}: {self.function} {verdict}",
            caption=(
                f"{self.samples} samples, {self.vectors} vectors, seed {self.seed}"
                + (f"; {self.note}" if self.note else "")
            ),
        )
        table.add_column("check")
        table.add_column("relative error", justify="right")
        table.add_column("tolerance", justify="right")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for row in self.rows:
            shown = _format(row.error, count=row.tolerance == 0)
            result = Text("pass", style="green") if row.passed else Text("FAIL", style="bold red")
            table.add_row(
                row.name,
                shown,
                _format(row.tolerance, count=row.tolerance == 0),
                result,
                Text(row.detail),
            )
        return table


# ---- the checks: (function, x (B, n) read-only, K, rng) -> (error, detail) ------------------

CheckFn = Callable[[Function, np.ndarray, int, np.random.Generator], tuple[float, str]]


def _shapes(f: Function, x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[float, str]:
    """forward/vjp/jvp shapes and dtype, finite values, no writes into read-only inputs."""
    b, n, m = x.shape[0], f.n_in, f.n_out
    problems: list[str] = []
    v = _readonly(rng.standard_normal((b, k, m)), f.dtype)
    t = _readonly(rng.standard_normal((b, k, n)), f.dtype)
    calls: dict[str, Callable[[], Any]] = {
        "forward": lambda: (f.forward_batch(x),),
        "vjp": lambda: f.vjp_batch(x, v),
        "jvp": lambda: f.jvp_batch(x, t),
    }
    expected = {
        "forward": [(b, m)],
        "vjp": [(b, m), (b, k, n)],
        "jvp": [(b, m), (b, k, m)],
    }
    for name, call in calls.items():
        try:
            out = call()
        except Exception as exc:
            problems.append(f"{name} raised {type(exc).__name__}: {exc}")
            continue
        if not isinstance(out, tuple) or len(out) != len(expected[name]):
            problems.append(f"{name} returned {type(out).__name__}, expected {len(expected[name])} arrays")
            continue
        for i, (arr, shape) in enumerate(zip(out, expected[name], strict=True)):
            what = f"{name}[{i}]" if len(out) > 1 else name
            if not isinstance(arr, np.ndarray):
                problems.append(f"{what} is {type(arr).__name__}, not an ndarray")
            elif arr.shape != shape:
                problems.append(f"{what} has shape {arr.shape}, expected {shape}")
            elif arr.dtype != f.dtype:
                problems.append(f"{what} has dtype {arr.dtype}, expected {f.dtype}")
            elif not np.isfinite(arr).all():
                problems.append(f"{what} has non-finite values")
    detail = "; ".join(problems) or (
        f"forward ({b}, {m}), vjp ({b}, {k}, {n}), jvp ({b}, {k}, {m}), {f.dtype}"
    )
    return float(len(problems)), detail


def _consistency(f: Function, x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[float, str]:
    """The y of vjp/jvp equals forward(x); broadcast shared vectors equal contiguous copies."""
    b, n, m = x.shape[0], f.n_in, f.n_out
    y = _f64(f.forward(x))
    v_shared = _readonly(rng.standard_normal((k, m)), f.dtype)
    t_shared = _readonly(rng.standard_normal((k, n)), f.dtype)
    y_v, xbar_view = f.vjp(x, np.broadcast_to(v_shared, (b, k, m)))
    _, xbar_copy = f.vjp(x, _readonly(np.broadcast_to(v_shared, (b, k, m)), f.dtype))
    y_t, ydot_view = f.jvp(x, np.broadcast_to(t_shared, (b, k, n)))
    _, ydot_copy = f.jvp(x, _readonly(np.broadcast_to(t_shared, (b, k, n)), f.dtype))
    errors = {
        "vjp y vs forward": _relative(_f64(y_v) - y, y),
        "jvp y vs forward": _relative(_f64(y_t) - y, y),
        "vjp broadcast vs copy": _relative(_f64(xbar_view) - _f64(xbar_copy), _f64(xbar_copy)),
        "jvp broadcast vs copy": _relative(_f64(ydot_view) - _f64(ydot_copy), _f64(ydot_copy)),
    }
    worst = max(errors, key=lambda key: _nan_last(errors[key]))
    if errors[worst] == 0:
        return 0.0, "vjp and jvp y equal forward; broadcast vectors equal copies, exactly"
    return errors[worst], f"worst: {worst}"


def _finite_differences(f: Function, x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[float, str]:
    """Central differences (f(x + h t) - f(x - h t)) / 2h against J t, per sample and tangent.

    The step h scans :data:`FD_STEPS` times eps**(1/3) * (max|x_b| + 1), as the 4D-Var
    gradient test scans its step: eps**(1/3) balances truncation (h^2) and rounding (eps / h)
    for a tame function, while a long chaotic flow needs a far smaller h. Each pair keeps the
    step with the smallest max(difference, allowance), and its error is the difference beyond
    the allowance: the rounding noise of the differences (4 noise / h, the noise measured at
    the smallest steps and at least eps |f|) plus their truncation (fd_s - fd_{s+1}, which a
    wrong jvp cancels out of, so allowing for it cannot hide a bug). The tangent compared is
    the one actually applied after rounding x +- h t to the dtype; a step that rounding
    distorts by over 10 % is not used.
    """
    b, n = x.shape
    eps = float(np.finfo(f.dtype).eps)
    base = eps ** (1 / 3) * (np.abs(_f64(x)).max(axis=1) + 1)  # (B,)
    t = rng.standard_normal((b, k, n))
    shape = (len(FD_STEPS), b, k)
    diff, own, y_size = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    usable = np.zeros(shape, dtype=bool)
    truncation = np.full(shape, np.inf)
    h = FD_STEPS[:, None, None] * base[None, :, None]  # (S, B, 1)
    previous = None
    for s in range(len(FD_STEPS)):  # one step at a time: memory of one (B, K, n) batch
        step = h[s][:, :, None] * t
        x_plus = (_f64(x)[:, None, :] + step).astype(f.dtype)
        x_minus = (_f64(x)[:, None, :] - step).astype(f.dtype)
        tangent = (_f64(x_plus) - _f64(x_minus)) / (2 * h[s][:, :, None])
        usable[s] = _norm(tangent - t) <= 0.1 * _norm(t)
        y_plus = _f64(f.forward(x_plus.reshape(b * k, n))).reshape(b, k, -1)
        y_minus = _f64(f.forward(x_minus.reshape(b * k, n))).reshape(b, k, -1)
        fd = (y_plus - y_minus) / (2 * h[s][:, :, None])
        _, jt = f.jvp(x, _readonly(tangent, f.dtype))
        jt = _f64(jt)
        diff[s] = _norm(fd - jt)
        own[s] = np.maximum(_norm(fd), _norm(jt))
        y_size[s] = np.maximum(_norm(y_plus), _norm(y_minus))
        if previous is not None:
            truncation[s - 1] = _norm(previous - fd)
        previous = fd
    # h * diff = C h^3 + noise >= noise, and is the noise alone at the smallest steps.
    measured = np.nanmin(np.where(usable, diff * h, np.nan), axis=0, initial=np.inf)
    noise = np.maximum(eps * y_size, measured)
    allowance = 4 * noise / h + truncation
    bound = np.where(usable & ~np.isnan(diff), np.maximum(diff, allowance), np.inf)
    best = np.argmin(bound, axis=0)[None]  # (1, B, K)
    pick = lambda a: np.take_along_axis(np.broadcast_to(a, shape), best, axis=0)[0]  # noqa: E731
    error = _pairwise(np.maximum(pick(diff) - pick(allowance), 0), pick(own))
    error[np.isnan(diff).all(axis=0) | ~np.isfinite(pick(bound))] = np.nan
    coarse = int((pick(allowance) > 1e-2 * np.maximum(pick(own), 1e-300)).sum())
    i, j = np.unravel_index(_argmax(error), error.shape)
    note = f"; {coarse} of {b * k} pairs not resolved to 1 % in {f.dtype}" if coarse else ""
    return float(error[i, j]), (
        f"worst sample {i}, tangent {j}, at its best step h = {pick(h)[i, j]:.1e}" + note
    )


def _dot_product(f: Function, x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[float, str]:
    """<v, J t> against <J^T v, t> per sample and vector pair.

    Relative to the larger of the two, or to the typical size of a random inner product
    (|v| |J t| / sqrt(m)) when that is larger, since a single pair may cancel to near zero.
    """
    b, n, m = x.shape[0], f.n_in, f.n_out
    v = _readonly(rng.standard_normal((b, k, m)), f.dtype)
    t = _readonly(rng.standard_normal((b, k, n)), f.dtype)
    _, jt = f.jvp(x, t)
    _, vj = f.vjp(x, v)
    jt, vj = _f64(jt), _f64(vj)
    left = np.einsum("bkm,bkm->bk", _f64(v), jt)
    right = np.einsum("bkn,bkn->bk", vj, _f64(t))
    typical = np.maximum(_norm(_f64(v)) * _norm(jt) / np.sqrt(m), _norm(vj) * _norm(_f64(t)) / np.sqrt(n))
    scale = np.maximum(np.maximum(np.abs(left), np.abs(right)), typical)
    error = _ratio(np.abs(left - right), scale)
    i, j = np.unravel_index(_argmax(error), error.shape)
    return float(error[i, j]), (
        f"worst sample {i}, vector {j}: <v, Jt> = {left[i, j]:.6g}, <J^T v, t> = {right[i, j]:.6g}"
    )


def _basis(f: Function, x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[float, str]:
    """Dense J from vjp of output unit vectors against dense J from jvp of input unit vectors.

    At most :data:`MAX_BASIS` random rows and columns, so wide functions stay cheap.
    """
    b, n, m = x.shape[0], f.n_in, f.n_out
    rows = _subset(m, MAX_BASIS, rng)
    cols = _subset(n, MAX_BASIS, rng)
    out_basis = _readonly(_unit_vectors(m, rows), f.dtype)
    in_basis = _readonly(_unit_vectors(n, cols), f.dtype)
    _, j_rev = f.vjp(x, np.broadcast_to(out_basis, (b, *out_basis.shape)))  # (B, r, n) = J[rows]
    _, j_fwd = f.jvp(x, np.broadcast_to(in_basis, (b, *in_basis.shape)))  # (B, c, m) = J[:, cols].T
    rev = _f64(j_rev)[:, :, cols]
    fwd = _f64(j_fwd)[:, :, rows].transpose(0, 2, 1)
    own = np.maximum(_norm(rev, (1, 2)), _norm(fwd, (1, 2)))
    error = _pairwise(_norm(rev - fwd, (1, 2)), own)
    i = _argmax(error)
    size = f"J[{len(rows)} of {m} outputs, {len(cols)} of {n} inputs]"
    return float(error[i]), f"{size}; worst sample {i}"


def _row_independence(f: Function, x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[float, str]:
    """Perturb sample i by about 1 % and measure the change leaked into the other rows."""
    b = x.shape[0]
    y = _f64(f.forward(x))
    samples = _subset(b, MAX_ROWS, rng)
    own = np.zeros(len(samples))
    leak = np.zeros(len(samples))
    where = np.zeros(len(samples), dtype=int)
    for s, i in enumerate(samples):
        perturbed = x.copy()
        row = _f64(x[i])
        perturbed[i] = row + 1e-2 * (np.abs(row) + 1) * rng.uniform(-1, 1, row.shape)
        fd = _fd_function(f)
        if fd is not None and fd.bounds is not None:  # f's domain (fd.bounds): f may raise outside it
            fd.bounds.clip(perturbed[i : i + 1])
        change = _norm(_f64(f.forward(perturbed)) - y)
        own[s] = change[i]
        change[i] = 0
        where[s] = int(np.argmax(change))
        leak[s] = change[where[s]]
    error = _pairwise(leak, own)
    s = _argmax(error)
    summary = f"{len(samples)} of {b} samples perturbed"
    if leak[s] == 0:
        return float(error[s]), f"{summary}; no other row changed"
    return float(error[s]), (
        f"{summary}; worst: sample {samples[s]} moved row {where[s]} by {leak[s]:.2g} "
        f"(its own row by {own[s]:.2g})"
    )


CHECKS: dict[str, CheckFn] = {
    "shapes": _shapes,
    "consistency": _consistency,
    "finite_differences": _finite_differences,
    "dot_product": _dot_product,
    "basis": _basis,
    "row_independence": _row_independence,
}
"""Every check, in the order they run and appear in a report."""


# ---- sparse Jacobians: (function, sparse, x, K, rng) -> (error, detail) ----------------------

SparseCheckFn = Callable[
    [Function, "SparseJacobian", np.ndarray, int, np.random.Generator], tuple[float, str]
]
MAX_DENSE_ENTRIES = 1 << 22
"""``sparse_dense`` runs when one sample's dense Jacobian has at most this many entries."""


def _sparse_products(
    f: Function, sparse: SparseJacobian, x: np.ndarray, k: int, rng: np.random.Generator, forward: bool
) -> tuple[float, str]:
    """J t (or v^T J) from the decompressed nonzeros against the function's own jvp (vjp) on
    random vectors: a nonzero that the pattern lacks shows up as a difference."""
    b = x.shape[0]
    _, values = sparse.evaluate(f, x, outputs=False)
    values = _f64(values)
    width = f.n_in if forward else f.n_out
    vectors = rng.standard_normal((b, k, width))
    if forward:
        _, expected = f.jvp(x, _readonly(vectors, f.dtype))
    else:
        _, expected = f.vjp(x, _readonly(vectors, f.dtype))
    got = np.empty_like(_f64(expected))
    for i in range(b):  # a few samples, each one sparse matrix product
        jac = sparse.csr(values[i])
        got[i] = (jac @ vectors[i].T).T if forward else (jac.T @ vectors[i].T).T
    error = _pairwise(_norm(got - _f64(expected)), np.maximum(_norm(got), _norm(_f64(expected))))
    i, j = np.unravel_index(_argmax(error), error.shape)
    what = "J t" if forward else "v^T J"
    detail = f"{what} from {sparse.nnz} nonzeros vs the kernel; worst sample {i}, vector {j}"
    return float(error[i, j]), detail


def _sparse_jvp(f, sparse, x, k, rng) -> tuple[float, str]:
    return _sparse_products(f, sparse, x, k, rng, forward=True)


def _sparse_vjp(f, sparse, x, k, rng) -> tuple[float, str]:
    return _sparse_products(f, sparse, x, k, rng, forward=False)


def _sparse_dense(f, sparse, x, k, rng) -> tuple[float, str]:
    """Every entry against the dense Jacobian (small functions only): values and pattern."""
    if f.n_in * f.n_out > MAX_DENSE_ENTRIES:
        return 0.0, f"skipped: a dense J has {f.n_out * f.n_in:,} entries (over {MAX_DENSE_ENTRIES:,})"
    _, values = sparse.evaluate(f, x, outputs=False)
    _, dense = f.jacobian(x)
    dense = _f64(dense)
    got = np.stack([sparse.csr(_f64(v)).toarray() for v in values])
    error = _pairwise(_norm(got - dense, (1, 2)), _norm(dense, (1, 2)))
    i = _argmax(error)
    outside = int(np.count_nonzero((dense != 0).any(axis=0) & ~sparse.pattern().toarray()))
    detail = f"J[{f.n_out} x {f.n_in}] dense vs sparse; worst sample {i}"
    return float(error[i]), detail + (f"; {outside} entries outside the pattern" if outside else "")


SPARSE_CHECKS: dict[str, SparseCheckFn] = {
    "sparse_jvp": _sparse_jvp,
    "sparse_vjp": _sparse_vjp,
    "sparse_dense": _sparse_dense,
}
"""The checks of a sparse Jacobian job: its nonzeros against the function's own products."""


def check_sparse(
    function: Function, sparse: SparseJacobian, x: np.ndarray, *, vectors: int = 2, seed: int = 0
) -> CheckReport:
    """Check a sparse Jacobian's decompressed nonzeros on a small batch ``x`` (B, n): J t and
    v^T J against the kernels' JVPs and VJPs, and (small n, m) every entry against the dense J.
    A pattern that misses a nonzero fails them."""
    dtype = np.dtype(function.dtype)
    x = _readonly(np.asarray(x), dtype)
    fd = _fd_function(function)
    limits = TOLERANCES[dtype.name] if fd is None else _fd_limits(fd, TOLERANCES[dtype.name])
    rows = _run(
        SPARSE_CHECKS,
        lambda run, rng: run(function, sparse, x, vectors, rng),
        limits,
        seed,
        100,
    )
    return CheckReport(
        function=repr(function),
        dtype=dtype.name,
        samples=x.shape[0],
        vectors=vectors,
        seed=seed,
        rows=rows,
        label=f"{dtype.name} sparse Jacobian ({sparse.nnz} nonzeros, {sparse.n_colours} colours)",
    )


def _run(
    checks: Mapping[str, Callable[..., tuple[float, str]]],
    call: Callable[[Callable[..., tuple[float, str]], np.random.Generator], tuple[float, str]],
    limits: Mapping[str, float],
    seed: int,
    offset: int = 0,
) -> tuple[CheckResult, ...]:
    """Each check of ``checks`` through ``call(check, rng)``, its own generator from (seed,
    offset + its index); a check that raises fails with the exception as its detail."""
    rows = []
    for index, (name, run) in enumerate(checks.items()):
        rng = np.random.default_rng([seed, offset + index])
        try:
            error, detail = call(run, rng)
        except Exception as exc:
            error, detail = float("inf"), f"raised {type(exc).__name__}: {exc}"
        rows.append(CheckResult(name, error, limits[name], bool(error <= limits[name]), detail))
    return tuple(rows)


# ---- finite differences: the methods compared -------------------------------------------------

FD_METHODS = ("forward", "central", "complex")


def _fd_function(function: Function):
    """``function`` when it is differenced by ``autodiff: fd``, else None."""
    from jacrun.functions.adapters.fd import FDFunction

    return function if isinstance(function, FDFunction) else None


def _fd_limits(fd, limits: Mapping[str, float]) -> dict[str, float]:
    """The checks that compare products taken with different steps (a tangent's own step
    against per-input steps) allow the job's method's tolerance."""
    own = limits[f"fd_{fd.method}"]
    return {
        **limits,
        "dot_product": max(limits["dot_product"], own),
        "sparse_jvp": max(limits["sparse_jvp"], own),
    }


def _fd_rows(fd, x: np.ndarray, k: int, seed: int, limits: Mapping[str, float]) -> tuple[CheckResult, ...]:
    """One row per method: its estimated relative error on up to :data:`FD_COLUMNS` Jacobian
    columns and ``k`` random tangents per sample. The reference is the complex step when f
    allows it (the complex step's own row: against the complex step at the relative step
    sqrt(eps), where its truncation, of order h^2, is still below rounding), else Richardson
    extrapolation of central differences at h and h / 2. The
    job's method (with the job's step) fails above its tolerance; the others (automatic steps)
    are shown for comparison, with an infinite tolerance."""
    from jacrun.functions.adapters.fd import complex_problem

    rng = np.random.default_rng([seed, 50])
    b, n = x.shape
    columns = _subset(n, FD_COLUMNS, rng)
    directions = np.concatenate(
        [np.broadcast_to(_unit_vectors(n, columns), (b, len(columns), n)), rng.standard_normal((b, k, n))],
        axis=1,
    )
    directions = _readonly(directions, fd.dtype)

    def products(function) -> np.ndarray:
        return _f64(function.jvp_batch(x, directions)[1])

    try:
        problem = complex_problem(fd)
        methods = FD_METHODS if problem is None else FD_METHODS[:2]
        if problem is None:
            exact = fd.with_method("complex")
            reference, against = products(exact), "the complex step"
            second = fd.with_method("complex", step=float(np.finfo(fd.dtype).eps) ** 0.5)
        else:
            coarse = fd.with_method("central")
            fine = fd.with_method("central", step=coarse.rel / 2)
            reference = (4 * products(fine) - products(coarse)) / 3
            against = f"Richardson extrapolation of central differences (not the complex step: {problem})"
        rows = []
        for method in methods:
            function = fd if method == fd.method else fd.with_method(method)
            if method == "complex":
                error = _pairwise(_norm(products(function) - products(second)), _norm(reference))
                versus = f"the complex step at {second.rel:.1e}"
            else:
                error = _pairwise(_norm(products(function) - reference), _norm(reference))
                versus = against
            i, j = np.unravel_index(_argmax(error), error.shape)
            where = f"column {columns[j]}" if j < len(columns) else f"tangent {j - len(columns)}"
            detail = f"vs {versus}; worst sample {i}, {where}"
            name = f"fd_{method}"
            if method == fd.method:
                tolerance = limits[name]
                rows.append(
                    CheckResult(name, float(error[i, j]), tolerance, bool(error[i, j] <= tolerance), detail)
                )
            else:
                detail = f"for comparison (the job uses {fd.method}); " + detail
                rows.append(CheckResult(name, float(error[i, j]), float("inf"), True, detail))
        return tuple(rows)
    except Exception as exc:  # noqa: BLE001 - the user's f raised: the job's method fails
        name = f"fd_{fd.method}"
        return (CheckResult(name, float("inf"), limits[name], False, f"raised {type(exc).__name__}: {exc}"),)


# ---- running -------------------------------------------------------------------------------


def check(
    function: Function,
    x: np.ndarray,
    *,
    vectors: int = 2,
    seed: int = 0,
    tolerances: Mapping[str, float] | None = None,
) -> CheckReport:
    """Run every check of :data:`CHECKS` on a small batch ``x`` (B >= 2, n) and report.

    ``vectors`` random vectors per sample (K), drawn from ``seed``; ``tolerances`` overrides
    defaults by check name. A check whose kernel raises fails with the exception as detail.
    """
    dtype = np.dtype(function.dtype)
    if dtype.name not in TOLERANCES:
        raise ValueError(f"checks support float32 and float64 functions, not {dtype}")
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != function.n_in:
        raise ValueError(f"x must have shape (batch, {function.n_in}), got {x.shape}")
    if x.shape[0] < 2:
        raise ValueError("checks need at least 2 samples (row_independence compares rows)")
    if not np.isfinite(x).all():
        raise ValueError("x has non-finite values")
    if vectors < 1:
        raise ValueError(f"vectors must be at least 1, got {vectors}")
    known = [*CHECKS, *(f"fd_{method}" for method in FD_METHODS)]
    unknown = set(tolerances or {}) - set(known)
    if unknown:
        raise ValueError(f"unknown checks in tolerances: {sorted(unknown)}; known: {known}")
    limits = {**TOLERANCES[dtype.name], **(tolerances or {})}
    x = _readonly(x, dtype)
    fd = _fd_function(function)
    if fd is None:
        rows = _run(CHECKS, lambda run, rng: run(function, x, vectors, rng), limits, seed)
    else:
        limits = _fd_limits(fd, limits)
        table = {name: run for name, run in CHECKS.items() if name != "finite_differences"}
        rows = _run(table, lambda run, rng: run(function, x, vectors, rng), limits, seed)
        rows = rows[:2] + _fd_rows(fd, x, vectors, seed, limits) + rows[2:]
    return CheckReport(
        function=repr(function),
        dtype=dtype.name,
        samples=x.shape[0],
        vectors=vectors,
        seed=seed,
        rows=rows,
        label=dtype.name,
    )


def check_spec(
    spec: Mapping[str, Any] | FunctionSpec,
    x: np.ndarray,
    *,
    vectors: int = 2,
    seed: int = 0,
    tolerances: Mapping[str, float] | None = None,
    base_dir: Path | None = None,
) -> list[CheckReport]:
    """Build the function of a config section and :func:`check` it.

    A float32 function is also rechecked in float64 (the same spec with ``dtype: float64``):
    float32 finite differences are coarse, so the recheck tells a real bug from rounding.
    A recheck that cannot be built (a python target without a ``dtype`` parameter) is an
    empty report with a note, not a failure. ``tolerances`` apply to the first report; the
    recheck uses the float64 defaults.
    """
    spec = parse_spec(spec, base_dir)
    reports = [check(build_function(spec), x, vectors=vectors, seed=seed, tolerances=tolerances)]
    if spec.dtype == "float32":
        label = "float64 recheck"
        spec64 = spec.model_copy(update={"dtype": "float64"})
        try:
            f64 = build_function(spec64)
        except (ValueError, TypeError, NotImplementedError) as exc:
            reports.append(
                CheckReport(
                    function=reports[0].function,
                    dtype="float64",
                    samples=int(np.shape(x)[0]),
                    vectors=vectors,
                    seed=seed,
                    rows=(),
                    label=label,
                    note=f"skipped, cannot build in float64: {exc}",
                )
            )
        else:
            report = check(f64, x, vectors=vectors, seed=seed)
            reports.append(replace(report, label=label))
    return reports


# ---- helpers -------------------------------------------------------------------------------


def _readonly(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A read-only contiguous copy, so a kernel that writes into its inputs raises."""
    out = np.array(a, dtype=dtype, copy=True, order="C")
    out.setflags(write=False)
    return out


def _unit_vectors(size: int, which: np.ndarray) -> np.ndarray:
    """Rows ``which`` of the identity of ``size``, without the identity (size may be 65,536)."""
    out = np.zeros((len(which), size))
    out[np.arange(len(which)), which] = 1
    return out


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _norm(a: np.ndarray, axis: int | tuple[int, ...] = -1) -> np.ndarray:
    return np.sqrt(np.sum(np.square(a), axis=axis))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 / 0 = 0 and x / 0 = inf; NaN stays NaN."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, np.inf)
    np.divide(num, den, out=out, where=den > 0)
    out[(den == 0) & (num == 0)] = 0.0
    out[np.isnan(num) | np.isnan(den)] = np.nan
    return out


def _pairwise(diff: np.ndarray, own: np.ndarray) -> np.ndarray:
    """diff relative to ``own``, or to the batch's median of ``own`` when that is larger."""
    finite = own[np.isfinite(own)]
    typical = float(np.median(finite)) if finite.size else 0.0
    return _ratio(diff, np.maximum(own, typical))


def _relative(diff: np.ndarray, ref: np.ndarray) -> float:
    """max |diff| per row relative to the batch's largest |ref| row norm (one number)."""
    return float(_ratio(np.max(_norm(diff)), np.max(_norm(ref))))


def _argmax(error: np.ndarray) -> int:
    """Flat index of the largest error, NaN counted as the largest."""
    flat = np.where(np.isnan(error), np.inf, error).ravel()
    return int(np.argmax(flat))


def _nan_last(value: float) -> float:
    return float("inf") if np.isnan(value) else value


def _subset(size: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """All of ``range(size)``, or ``limit`` of them at random (sorted)."""
    if size <= limit:
        return np.arange(size)
    return np.sort(rng.choice(size, limit, replace=False))


def _json_float(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _format(value: float, *, count: bool = False) -> str:
    if not np.isfinite(value):
        return str(value)
    return str(int(value)) if count else f"{value:.1e}"
