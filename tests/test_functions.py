"""The built-in kernels: adjoint consistency, finite differences, Jacobians, specs, cost models.

Every built-in runs the same battery (dot-product test, finite differences, basis VJP vs basis
JVP, rev vs fwd Jacobians, vector layouts, cost model against measured memory); the kind-specific
behaviour (activations, weight files, exact linear Jacobians, spec validation) follows.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jacrun.functions import Function, build_function, kinds
from jacrun.functions.activations import ACTIVATIONS, ActivationName, activation
from jacrun.functions.linear import Linear, ufunc_buffer_bytes
from jacrun.functions.lorenz96 import Lorenz96
from jacrun.functions.mlp import MLP, glorot_weights, load_weights
from jacrun.functions.rosenbrock import Rosenbrock

# ---- shared helpers ------------------------------------------------------------------------------

SPECS: dict[str, dict[str, Any]] = {
    "mlp-tanh": {"kind": "mlp", "sizes": [5, 16, 12, 3], "activation": "tanh", "seed": 1},
    "mlp-gelu-widening": {"kind": "mlp", "sizes": [3, 9, 7], "activation": "gelu"},
    "mlp-relu-deep": {"kind": "mlp", "sizes": [6, 10, 10, 10, 2], "activation": "relu"},
    "mlp-one-layer": {"kind": "mlp", "sizes": [4, 6]},
    "linear": {"kind": "linear", "n_in": 7, "n_out": 4, "seed": 3},
    "linear-tall": {"kind": "linear", "n_in": 2, "n_out": 6},
    "rosenbrock-2": {"kind": "rosenbrock", "dim": 2},
    "rosenbrock-10": {"kind": "rosenbrock", "dim": 10},
    "lorenz96": {"kind": "lorenz96", "dim": 6, "steps": 3, "dt": 0.05},
    "lorenz96-one-step": {"kind": "lorenz96", "dim": 4, "forcing": 3.5},
    "bratu-5": {"kind": "bratu", "grid": 5},
    "bratu-1": {"kind": "bratu", "grid": 1, "lam": 2.0},
}
NAMES = list(SPECS)
BATCH_K = [(1, 1), (1, 3), (4, 1), (4, 3), (50, 1), (50, 3)]
DTYPES = ["float64", "float32"]
DOT_TOL = {"float64": 1e-10, "float32": 1e-4}
FD_TOL = {"mlp": 1e-7, "linear": 1e-6, "rosenbrock": 1e-6, "lorenz96": 1e-6, "bratu": 1e-6}


def make(name: str, dtype: str = "float64") -> Function:
    """Build a named test function through the registry, as a config would."""
    return build_function({**SPECS[name], "dtype": dtype})


def draw(f: Function, batch: int, k: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random x (B, n), cotangents v (B, K, m) and tangents t (B, K, n) in f's dtype."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, f.n_in))
    v = rng.standard_normal((batch, k, f.n_out))
    t = rng.standard_normal((batch, k, f.n_in))
    return tuple(a.astype(f.dtype) for a in (x, v, t))


def dot_gap(v: np.ndarray, jt: np.ndarray, vj: np.ndarray, t: np.ndarray) -> float:
    """Worst per-vector |<v, J t> - <J^T v, t>|, relative to |v||Jt| + |J^T v||t|."""
    v, jt, vj, t = (a.astype(np.float64) for a in (v, jt, vj, t))
    lhs = np.einsum("...m,...m->...", v, jt)
    rhs = np.einsum("...n,...n->...", vj, t)
    norm = np.linalg.norm
    scale = norm(v, axis=-1) * norm(jt, axis=-1) + norm(vj, axis=-1) * norm(t, axis=-1)
    return float(np.max(np.abs(lhs - rhs) / np.maximum(scale, 1e-300), initial=0.0))


def central_difference(forward: Any, x: np.ndarray, t: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """(f(x + h t) - f(x - h t)) / 2h per sample and vector, h scaled to |x| and |t|."""
    batch, k, n = t.shape
    h = step * np.maximum(1.0, np.linalg.norm(x, axis=-1))[:, None, None]
    h = h / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-300)
    plus = forward((x[:, None, :] + h * t).reshape(batch * k, n))
    minus = forward((x[:, None, :] - h * t).reshape(batch * k, n))
    return (plus - minus).reshape(batch, k, -1) / (2 * h)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """|a - b| / |b| over the last axis, worst case (0 when both vanish)."""
    diff = np.linalg.norm(np.asarray(a, np.float64) - b, axis=-1)
    return float(np.max(diff / np.maximum(np.linalg.norm(b, axis=-1), 1e-300), initial=0.0))


# ---- the battery, for every built-in ---------------------------------------------------------


@pytest.mark.parametrize("batch,k", BATCH_K)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_dot_product(name: str, dtype: str, batch: int, k: int) -> None:
    f = make(name, dtype)
    x, v, t = draw(f, batch, k)
    y, vj = f.vjp(x, v)
    y2, jt = f.jvp(x, t)
    assert vj.shape == (batch, k, f.n_in) and jt.shape == (batch, k, f.n_out)
    for arr in (y, y2, vj, jt):
        assert arr.dtype == f.dtype and arr.flags.c_contiguous
    np.testing.assert_array_equal(y, f.forward(x))
    np.testing.assert_array_equal(y2, y)
    assert dot_gap(v, jt, vj, t) < DOT_TOL[dtype]


@pytest.mark.parametrize("batch,k", BATCH_K)
@pytest.mark.parametrize("name", NAMES)
def test_jvp_matches_central_differences(name: str, batch: int, k: int) -> None:
    f = make(name)
    x, _, t = draw(f, batch, k, seed=1)
    _, jt = f.jvp(x, t)
    fd = central_difference(f.forward, x, t)
    assert rel_err(fd, jt) < FD_TOL[f.kind]


@pytest.mark.parametrize("batch", [1, 4, 50])
@pytest.mark.parametrize("name", NAMES)
def test_basis_vjp_equals_basis_jvp(name: str, batch: int) -> None:
    """J assembled row by row (vjp of e_i) equals J column by column (jvp of e_j)."""
    f = make(name)
    x, _, _ = draw(f, batch, 1, seed=2)
    # per-sample (contiguous) basis vectors, unlike Function.jacobian's shared broadcast view
    out_basis = np.tile(np.eye(f.n_out, dtype=f.dtype), (batch, 1, 1))
    in_basis = np.tile(np.eye(f.n_in, dtype=f.dtype), (batch, 1, 1))
    _, rows = f.vjp(x, out_basis)
    _, cols = f.jvp(x, in_basis)
    jac = cols.transpose(0, 2, 1)
    scale = np.max(np.abs(jac)) or 1.0
    assert np.max(np.abs(rows - jac)) <= 1e-12 * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_jacobian_rev_equals_fwd(name: str, dtype: str) -> None:
    f = make(name, dtype)
    x, _, _ = draw(f, 7, 1, seed=3)
    y_rev, j_rev = f.jacobian(x, "rev")
    y_fwd, j_fwd = f.jacobian(x, "fwd")
    assert j_rev.shape == j_fwd.shape == (7, f.n_out, f.n_in)
    np.testing.assert_array_equal(y_rev, y_fwd)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(j_rev, j_fwd, rtol=tol, atol=tol * np.max(np.abs(j_fwd)))


@pytest.mark.parametrize("name", NAMES)
def test_two_dimensional_vectors_are_squeezed(name: str) -> None:
    f = make(name)
    x, v, t = draw(f, 5, 1)
    _, vj = f.vjp(x, v[:, 0])
    _, jt = f.jvp(x, t[:, 0])
    assert vj.shape == (5, f.n_in) and jt.shape == (5, f.n_out)
    np.testing.assert_array_equal(vj, f.vjp(x, v)[1][:, 0])
    np.testing.assert_array_equal(jt, f.jvp(x, t)[1][:, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_read_only_vectors_are_not_written(name: str, dtype: str) -> None:
    """Shared vectors arrive as read-only broadcast views; per-sample ones may be read-only."""
    f = make(name, dtype)
    x, v, t = draw(f, 6, 3)
    _, vj_ref = f.vjp(x, v)
    _, jt_ref = f.jvp(x, t)
    x.setflags(write=False)
    for vec in (v, t):
        vec.setflags(write=False)
    _, vj = f.vjp(x, v)
    _, jt = f.jvp(x, t)
    np.testing.assert_array_equal(vj, vj_ref)
    np.testing.assert_array_equal(jt, jt_ref)

    shared_v = np.broadcast_to(v[0], v.shape)  # the same K vectors for every sample
    shared_t = np.broadcast_to(t[0], t.shape)
    before = (shared_v.copy(), shared_t.copy())
    _, vj = f.vjp(x, shared_v)
    _, jt = f.jvp(x, shared_t)
    np.testing.assert_array_equal(shared_v, before[0])
    np.testing.assert_array_equal(shared_t, before[1])
    assert vj.flags.c_contiguous and jt.flags.c_contiguous
    tol = 1e-12 if dtype == "float64" else 1e-5
    _, vj_copy = f.vjp(x, np.ascontiguousarray(shared_v))
    _, jt_copy = f.jvp(x, np.ascontiguousarray(shared_t))
    np.testing.assert_allclose(vj, vj_copy, rtol=tol, atol=tol)
    np.testing.assert_allclose(jt, jt_copy, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name: str) -> None:
    f = make(name)
    x, v, t = draw(f, 0, 2)
    assert f.forward(x).shape == (0, f.n_out)
    assert f.vjp(x, v)[1].shape == (0, 2, f.n_in)
    assert f.jvp(x, t)[1].shape == (0, 2, f.n_out)


NO_WORK_BUFFERS = {"linear", "linear-tall", "mlp-one-layer"}
"""Kernels that write every product straight into the result: no temporaries but the ufunc
allowance, whatever the batch."""


@pytest.mark.parametrize("mode", ["vjp", "jvp", "jacobian"])
@pytest.mark.parametrize("name", NAMES)
def test_cost_models_are_positive_and_grow(name: str, mode: str) -> None:
    f = make(name)
    for cost in (f.work_bytes, f.flops):
        values = {(b, k): cost(b, k, mode) for b in (1, 10, 100) for k in (1, 4, 16)}
        assert all(math.isfinite(c) and c > 0 for c in values.values())
        for (b, k), c in values.items():
            assert values.get((b * 10, k), c) >= c and values.get((b, k * 4), c) >= c
        if cost == f.work_bytes and name in NO_WORK_BUFFERS:
            assert set(values.values()) == {ufunc_buffer_bytes(f.dtype)}
        else:
            assert values[(100, 16)] > values[(10, 4)] > values[(1, 1)]
    assert isinstance(f.work_bytes(10, 4, mode), int)
    assert isinstance(f.flops(10, 4, mode), float)


def test_mlp_work_is_bounded_by_chunks() -> None:
    """Large batches run in chunks of about GEMM_ROWS GEMM rows: the work buffers stop growing
    with the batch, and more vectors per sample mean fewer samples per chunk."""
    f = build_function({"kind": "mlp", "sizes": [64, 512, 512, 16]})
    assert f.work_bytes(10**6, 1, "vjp") == f.work_bytes(10**5, 1, "vjp")
    assert f.work_bytes(10**6, 1, "vjp") > f.work_bytes(1000, 1, "vjp")
    assert f.work_bytes(10**6, 64, "vjp") < 2 * f.work_bytes(10**6, 1, "vjp")


_PEAK_SCRIPT = """
import json, sys, tracemalloc
import numpy as np
from jacrun.functions import build_function
from jacrun.functions.parallel import blas_limit, kernel_threads, split

def traced(kernel, x, vectors):
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    y, result = kernel(x, vectors)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return y, result, peak - base, current - base - y.nbytes - result.nbytes

def measure(case):
    batch, k, mode = case["batch"], case["k"], case["mode"]
    rng = np.random.default_rng(case["seed"])
    warm = build_function(case["spec"])  # lazy imports and NumPy's caches, on another instance
    f = build_function(case["spec"])
    x = (case["offset"] + rng.standard_normal((batch, f.n_in))).astype(f.dtype)
    width = f.n_out if mode == "vjp" else f.n_in
    vectors = rng.standard_normal((1 if case["shared"] else batch, k, width)).astype(f.dtype)
    vectors = np.broadcast_to(vectors, (batch, k, width))
    kernel = f.vjp_batch if mode == "vjp" else f.jvp_batch
    (warm.vjp_batch if mode == "vjp" else warm.jvp_batch)(x, vectors)
    y, result, peak, held = traced(kernel, x, vectors)  # first call: allocates the work buffers
    y2, result2, again, held2 = traced(kernel, x, vectors)  # reuses them
    out = {"peak": peak, "held": held, "again": again, "held_again": held2,
           "same": bool(np.array_equal(result, result2) and np.array_equal(y, y2)),
           "y": y.nbytes, "result": result.nbytes, "model": f.work_bytes(batch, k, mode),
           "threads": kernel_threads()}
    kernel_name = "vjp" if mode == "vjp" else "jvp"
    if f.kind == "mlp":  # the buffers, one set per kernel thread
        threads, span = split(batch, f._chunk_rows(batch, k), f._min_rows(k))
        out["shared_bytes"] = f._shared_elements(kernel_name, k) * f.dtype.itemsize * case["shared"]
    elif f.kind == "lorenz96":  # each kernel thread runs whole chunks
        threads, span = split(batch, f._chunk(batch, k), f._chunk(batch, k))
        out["shared_bytes"] = 0
    if f.kind in ("mlp", "lorenz96"):
        out["buffers"] = threads * sum(f._buffer_sizes(kernel_name, span, k).values()) * f.dtype.itemsize
        out["split"] = [threads, span]
    if case.get("threads", 1) > 1:  # the same numbers on one kernel thread
        with blas_limit(1):
            y1, r1 = kernel(x, vectors)
        scale = max(float(np.abs(result).max()), float(np.abs(y).max()), 1e-300)
        diff = max(float(np.abs(r1 - result).max()), float(np.abs(y1 - y).max()))
        out["one_thread_error"] = diff / scale / float(np.finfo(f.dtype).eps)  # in ulps of the largest
    return out

results = []
for case in json.load(sys.stdin):
    with blas_limit(case.get("threads", 1)):  # kernel threads = BLAS threads (1: exact peaks)
        results.append(measure(case))
print(json.dumps(results))
"""


def measured_peaks(cases: list[dict[str, Any]]) -> list[dict[str, int]]:
    """Peak traced bytes of a first and a second kernel call on one instance, the bytes each
    left allocated besides its results (the work buffers kept for the next call), the bytes
    returned and ``work_bytes``, per case.

    Each case: spec, mode, batch, k, shared (broadcast vectors), seed, offset (added to x).
    NumPy reports its buffers to tracemalloc, which traces every thread of a process, so the
    calls run in a fresh interpreter, away from the threads other tests leave running.
    """
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT],
        cwd=Path(__file__).resolve().parents[1],  # the checkout's jacrun comes first
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout)


WORK_SPECS: list[dict[str, Any]] = [
    {"kind": "mlp", "sizes": [30, 70, 50, 20], "activation": "gelu"},
    {"kind": "mlp", "sizes": [10, 80, 5], "dtype": "float32"},
    {"kind": "mlp", "sizes": [30, 20]},
    {"kind": "mlp", "sizes": [2, 300, 200, 1], "activation": "softplus"},  # tiny outputs
    {"kind": "linear", "n_in": 30, "n_out": 20},
    {"kind": "rosenbrock", "dim": 40},
    {"kind": "lorenz96", "dim": 40, "steps": 1},
    {"kind": "lorenz96", "dim": 40, "steps": 5, "dtype": "float32"},
    {"kind": "bratu", "grid": 12},
]


def kernel_cases(specs: list[dict[str, Any]], ks: tuple[int, int], **fixed: Any) -> list[dict[str, Any]]:
    """Every spec x vjp/jvp x per-sample/shared vectors x the two vector counts ``ks``."""
    return [
        {"spec": spec, "mode": mode, "shared": shared, "k": k, "offset": 0, **fixed}
        for spec in specs
        for mode in ("vjp", "jvp")
        for shared in (False, True)
        for k in ks
    ]


def case_id(case: dict[str, Any]) -> str:
    spec = "-".join(map(str, case["spec"].values()))
    return f"{spec}-{case['mode']}-{'shared' * case['shared']}-k{case['k']}"


WORK_CASES = kernel_cases(WORK_SPECS, (1, 3), batch=1000, seed=0)


@functools.cache
def _work_peaks() -> list[dict[str, int]]:
    return measured_peaks(WORK_CASES)


PARALLEL_SPECS: list[dict[str, Any]] = [
    {"kind": "mlp", "sizes": [30, 70, 50, 20], "activation": "gelu"},
    {"kind": "mlp", "sizes": [64, 256, 128, 8], "dtype": "float32"},
    {"kind": "lorenz96", "dim": 40, "steps": 2},
]
PARALLEL_CASES = kernel_cases(PARALLEL_SPECS, (1, 4), batch=3001, seed=1, threads=2)


@functools.cache
def _parallel_peaks() -> list[dict[str, int]]:
    return measured_peaks(PARALLEL_CASES)


@pytest.mark.parametrize(
    "index",
    range(len(PARALLEL_CASES)),
    ids=[case_id(c) for c in PARALLEL_CASES],
)
def test_kernel_threads_hold_their_modelled_buffers_and_give_the_same_numbers(index: int) -> None:
    """With BLAS at 2 threads the MLP and Lorenz-96 split their rows over 2 kernel threads: each
    holds its own buffers (modelled exactly, the derivative's scratch and ufunc buffers once per
    thread), the peak stays within the model, and the results agree with one thread's to
    rounding (BLAS may round differently for other row counts, as any two chunkings may)."""
    m = _parallel_peaks()[index]
    if m["threads"] < 2:
        pytest.skip("BLAS runs one thread here: no kernel threads to test")
    slack = 16 * 1024
    assert m["split"][0] == 2
    assert abs(m["held"] - m["buffers"] - m["shared_bytes"]) <= slack
    assert m["held"] <= m["model"]
    assert m["peak"] <= m["model"] + m["y"] + m["result"] + slack
    assert abs(m["held_again"]) <= slack and m["same"]
    assert m["one_thread_error"] <= 64


@pytest.mark.parametrize(
    "index",
    range(len(WORK_CASES)),
    ids=[case_id(c) for c in WORK_CASES],
)
def test_work_bytes_matches_measured_peak(index: int) -> None:
    """The model brackets the measured peak: arrays it counts are really live together, and
    nothing else is, beyond the kernel's outputs and the ufunc buffer allowance."""
    m = _work_peaks()[index]
    dtype = np.dtype(WORK_CASES[index]["spec"].get("dtype", "float64"))
    slack = 16 * 1024  # Python objects and small-array bookkeeping
    assert m["model"] - ufunc_buffer_bytes(dtype) <= m["peak"] + slack
    assert m["peak"] <= m["model"] + m["y"] + m["result"] + slack
    # the work buffers stay allocated (within the model) and the next call reuses them: it
    # allocates nothing but its results and the transient temporaries, and gives the same bytes
    assert 0 <= m["held"] <= m["model"] + slack and abs(m["held_again"]) <= slack
    assert m["again"] <= m["peak"] - m["held"] + slack
    assert m["same"]


# ---- activations -----------------------------------------------------------------------------


def test_activation_table_matches_the_spec_literal() -> None:
    from typing import get_args

    assert set(ACTIVATIONS) == set(get_args(ActivationName))
    with pytest.raises(ValueError, match="swish"):
        activation("swish")


def _gelu_tanh(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


REFERENCE = {
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "softplus": lambda z: np.log1p(np.exp(z)),
    "gelu": _gelu_tanh,
    "sin": np.sin,
    "identity": lambda z: z,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_values_and_derivatives(name: str, dtype: str) -> None:
    act = ACTIVATIONS[name]
    z = np.linspace(-6, 6, 241).astype(dtype)  # includes z = 0
    a = act.fn(z, np.empty_like(z))
    tol = 1e-14 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(a, REFERENCE[name](z.astype(np.float64)), rtol=tol, atol=tol)
    d = act.deriv(z, a, np.empty_like(z))
    # in place, as the MLP does: out=z for fn (forward only) and for deriv
    z2 = z.copy()
    np.testing.assert_array_equal(act.fn(z2, z2), a)
    z3 = z.copy()
    np.testing.assert_array_equal(act.deriv(z3, a, z3), d)
    assert a.dtype == d.dtype == np.dtype(dtype)
    if dtype == "float64":
        h = 1e-6
        fd = (REFERENCE[name](z + h) - REFERENCE[name](z - h)) / (2 * h)
        smooth = np.abs(z) > 2 * h if name == "relu" else np.ones_like(z, bool)
        np.testing.assert_allclose(d[smooth], fd[smooth], rtol=1e-8, atol=1e-9)


def test_gelu_is_pytorch_tanh_approximation() -> None:
    z = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    a = ACTIVATIONS["gelu"].fn(z, np.empty_like(z))
    np.testing.assert_allclose(a, _gelu_tanh(z), rtol=1e-15, atol=1e-16)
    # torch.nn.GELU(approximate="tanh")(torch.tensor(1.0, dtype=torch.float64))
    assert a[5] == pytest.approx(0.8411919906082768, rel=1e-14)


def test_relu_derivative_at_zero_is_zero() -> None:
    act = ACTIVATIONS["relu"]
    z = np.array([-1.0, 0.0, -0.0, 1e-300, 2.0])
    np.testing.assert_array_equal(act.deriv(z, act.fn(z, np.empty_like(z)), z.copy()), [0, 0, 0, 1, 1])
    # a network whose hidden pre-activations are exactly zero at x = 0
    f = MLP([[[1.0], [-1.0]], [[2.0, 3.0]]], [[0.0, 0.0], [0.0]], "relu")
    x = np.array([[0.0], [1.0], [-1.0]])
    _, jac = f.jacobian(x, "rev")
    np.testing.assert_array_equal(jac[:, 0, 0], [0.0, 2.0, -3.0])
    np.testing.assert_array_equal(f.jacobian(x, "fwd")[1], jac)


@pytest.mark.parametrize("name", ["sigmoid", "softplus", "tanh", "gelu"])
def test_activations_are_stable_in_the_tails(name: str) -> None:
    act = ACTIVATIONS[name]
    z = np.array([-800.0, -40.0, 40.0, 800.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        a = act.fn(z, np.empty_like(z))
        d = act.deriv(z, a, np.empty_like(z))
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(d))
    assert np.all(d >= 0) and np.all(d <= 1.2)


@pytest.mark.parametrize("batch,k", [(1, 1), (7, 3)])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_every_mlp_activation(act: str, batch: int, k: int) -> None:
    f = build_function({"kind": "mlp", "sizes": [4, 11, 9, 3], "activation": act, "seed": 5})
    x, v, t = draw(f, batch, k, seed=4)
    _, vj = f.vjp(x, v)
    _, jt = f.jvp(x, t)
    assert dot_gap(v, jt, vj, t) < 1e-10
    assert rel_err(central_difference(f.forward, x, t), jt) < 1e-7


# ---- mlp -------------------------------------------------------------------------------------


def _torch_layout(sizes: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """A state-dict-like mapping W_i (out, in), b_i (out,), as exported from torch Linear."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        arrays[f"W{i}"] = rng.standard_normal((n_out, n_in))
        arrays[f"b{i}"] = rng.standard_normal(n_out)
    return arrays


def _reference_mlp(arrays: dict[str, np.ndarray], x: np.ndarray, act: Any) -> np.ndarray:
    layers = len(arrays) // 2
    for i in range(layers):
        x = x @ arrays[f"W{i}"].T + arrays[f"b{i}"]
        if i < layers - 1:
            x = act(x)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_weights_from_npz(tmp_path: Path, dtype: str) -> None:
    sizes = [5, 8, 6, 2]
    arrays = _torch_layout(sizes)
    np.savez(tmp_path / "weights.npz", **arrays)
    spec = {"kind": "mlp", "sizes": sizes, "activation": "sin", "dtype": dtype}
    f = build_function({**spec, "weights": "weights.npz"}, base_dir=tmp_path)
    f_abs = build_function({**spec, "weights": str(tmp_path / "weights.npz")})
    x = np.random.default_rng(0).standard_normal((9, 5))
    expected = _reference_mlp(arrays, x, np.sin)
    tol = 1e-13 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(f.forward(x), expected, rtol=tol, atol=tol)
    np.testing.assert_array_equal(f_abs.forward(x), f.forward(x))
    assert f.weights[0].dtype == np.dtype(dtype) and f.weights[0].shape == (8, 5)
    weights, biases = load_weights(tmp_path / "weights.npz", sizes)
    direct = MLP(weights, biases, "sin", dtype)
    np.testing.assert_array_equal(direct.forward(x), f.forward(x))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(W1=a["W1"].T), r"W1 has shape \(8, 6\), expected \(6, 8\)"),
        (lambda a: a.update(b0=a["b0"][:-1]), r"b0 has shape \(7,\), expected \(8,\)"),
        (lambda a: a.pop("b2"), r"missing b2"),
        (lambda a: a.update(W3=np.ones((2, 2))), r"unexpected arrays W3"),
        (lambda a: a.update(W0=np.full((8, 5), np.nan)), r"W0 must hold finite numbers"),
    ],
    ids=["transposed", "short-bias", "missing", "extra", "nan"],
)
def test_mlp_bad_weights_name_the_array(tmp_path: Path, change: Any, match: str) -> None:
    arrays = _torch_layout([5, 8, 6, 2])
    change(arrays)
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        build_function({"kind": "mlp", "sizes": [5, 8, 6, 2], "weights": str(tmp_path / "w.npz")})


def test_mlp_weights_must_be_an_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.ones((2, 2)))
    with pytest.raises(ValueError, match="npz"):
        build_function({"kind": "mlp", "sizes": [2, 2], "weights": str(tmp_path / "w.npy")})


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"sizes": [3]}, "at least 2"),
        ({"sizes": [3, 0, 2]}, "greater than 0"),
        ({"sizes": [3, 2], "activation": "swish"}, "activation"),
        ({"sizes": [3, 2], "weights": "does/not/exist.npz"}, "no such file"),
        ({"sizes": [3, 2], "bias": 1}, "bias"),
    ],
)
def test_mlp_spec_validation(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        build_function({"kind": "mlp", **fields})


def test_mlp_refuses_seed_with_weights(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", **_torch_layout([3, 2]))
    with pytest.raises(ValidationError, match="seed cannot be combined with weights"):
        build_function({"kind": "mlp", "sizes": [3, 2], "seed": 1, "weights": str(tmp_path / "w.npz")})


def test_mlp_seeded_weights_are_glorot_and_reproducible() -> None:
    spec = {"kind": "mlp", "sizes": [300, 500, 4], "seed": 7}
    f, g = build_function(spec), build_function(spec)
    assert isinstance(f, MLP)
    for a, b in zip(f.weights + f.biases, g.weights + g.biases, strict=True):
        np.testing.assert_array_equal(a, b)
    assert f.weights[0].shape == (500, 300) and f.biases[0].shape == (500,)
    assert np.std(f.weights[0]) == pytest.approx(np.sqrt(2 / 800), rel=0.02)
    assert np.std(f.biases[0]) == pytest.approx(0.1, rel=0.15)
    other = build_function({**spec, "seed": 8})
    assert not np.array_equal(other.weights[0], f.weights[0])
    single = build_function({**spec, "dtype": "float32"})
    np.testing.assert_array_equal(single.weights[1], f.weights[1].astype(np.float32))
    weights, _ = glorot_weights([300, 500, 4], seed=7)
    np.testing.assert_array_equal(weights[1], f.weights[1])


def test_mlp_constructor_checks_shapes() -> None:
    with pytest.raises(ValueError, match="W1"):
        MLP([np.ones((4, 3)), np.ones((2, 5))], [np.ones(4), np.ones(2)])
    with pytest.raises(ValueError, match="b0"):
        MLP([np.ones((4, 3))], [np.ones(3)])
    with pytest.raises(ValueError, match="one bias per weight"):
        MLP([np.ones((4, 3))], [])
    with pytest.raises(ValueError, match="dtype"):
        MLP([np.ones((4, 3))], [np.ones(4)], dtype="int64")
    with pytest.raises(ValueError, match="activation"):
        MLP([np.ones((4, 3))], [np.ones(4)], activation="elu")
    f = MLP.random([3, 4, 2], "softplus", seed=1, dtype=np.float32)
    assert (f.n_in, f.n_out, f.sizes, f.dtype) == (3, 2, (3, 4, 2), np.dtype(np.float32))
    assert "sizes=[3, 4, 2]" in repr(f)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    act=st.sampled_from(list(ACTIVATIONS)),
    batch=st.integers(1, 12),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_mlp_any_shape(sizes: list[int], act: str, batch: int, k: int, seed: int) -> None:
    f = MLP.random(sizes, act, seed)
    x, v, t = draw(f, batch, k, seed)
    _, vj = f.vjp(x, v)
    _, jt = f.jvp(x, t)
    assert dot_gap(v, jt, vj, t) < 1e-10
    _, j_rev = f.jacobian(x, "rev")
    _, j_fwd = f.jacobian(x, "fwd")
    np.testing.assert_allclose(j_rev, j_fwd, rtol=1e-12, atol=1e-12 * np.max(np.abs(j_fwd)))


# ---- linear ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_jacobian_is_the_matrix_exactly(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    matrix, bias = rng.standard_normal((3, 5)), rng.standard_normal(3)
    np.save(tmp_path / "a.npy", matrix)
    np.save(tmp_path / "b.npy", bias)
    f = build_function(
        {"kind": "linear", "matrix": "a.npy", "bias": "b.npy", "dtype": dtype}, base_dir=tmp_path
    )
    assert (f.n_in, f.n_out) == (5, 3)
    x = rng.standard_normal((6, 5))
    expected = matrix.astype(dtype)
    for strategy in ("rev", "fwd", "auto"):
        _, jac = f.jacobian(x, strategy)
        for row in jac:
            np.testing.assert_array_equal(row, expected)
    tol = 1e-14 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(f.forward(x), x @ matrix.T + bias, rtol=tol, atol=tol)


def test_linear_constructor_and_random() -> None:
    f = Linear([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    np.testing.assert_array_equal(f.forward(np.array([[1.0, 1.0]])), [[3.0, 7.0, 11.0]])
    g = Linear.random(40, 30, seed=2)
    h = build_function({"kind": "linear", "n_in": 40, "n_out": 30, "seed": 2})
    np.testing.assert_array_equal(g.matrix, h.matrix)
    assert np.std(g.matrix) == pytest.approx(1 / np.sqrt(40), rel=0.1)
    with pytest.raises(ValueError, match="bias"):
        Linear(np.ones((3, 2)), np.ones(2))
    with pytest.raises(ValueError, match="2-D"):
        Linear(np.ones(3))


@pytest.mark.parametrize(
    "fields,match",
    [
        ({}, "n_in and n_out"),
        ({"n_in": 3}, "n_in and n_out"),
        ({"matrix": "a.npy", "n_in": 3}, "n_in cannot be combined with matrix"),
        ({"matrix": "a.npy", "n_out": 2, "n_in": 3}, "n_in and n_out cannot be combined"),
        ({"matrix": "a.npy", "seed": 1}, "seed cannot be combined with matrix"),
        ({"matrix": "missing.npy"}, "no such file"),
        ({"n_in": 0, "n_out": 2}, "greater than 0"),
    ],
)
def test_linear_spec_refuses_inconsistent_combinations(
    tmp_path: Path, fields: dict[str, Any], match: str
) -> None:
    np.save(tmp_path / "a.npy", np.ones((2, 3)))
    with pytest.raises(ValidationError, match=match):
        build_function({"kind": "linear", **fields}, base_dir=tmp_path)


def test_linear_bad_files(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((2, 3)))
    np.save(tmp_path / "b3.npy", np.ones(3))
    np.save(tmp_path / "v.npy", np.ones(4))
    np.savez(tmp_path / "a.npz", a=np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        build_function({"kind": "linear", "matrix": "a.npy", "bias": "b3.npy"}, base_dir=tmp_path)
    with pytest.raises(ValueError, match="2-D"):
        build_function({"kind": "linear", "matrix": "v.npy"}, base_dir=tmp_path)
    with pytest.raises(ValueError, match=".npz"):
        build_function({"kind": "linear", "matrix": "a.npz"}, base_dir=tmp_path)
    # a bias file next to a drawn matrix is consistent
    f = build_function({"kind": "linear", "n_in": 4, "n_out": 3, "bias": "b3.npy"}, base_dir=tmp_path)
    np.testing.assert_array_equal(f.forward(np.zeros((1, 4))), [[1.0, 1.0, 1.0]])


# ---- rosenbrock ------------------------------------------------------------------------------


def test_rosenbrock_values_and_jacobian() -> None:
    f = build_function({"kind": "rosenbrock", "dim": 4})
    np.testing.assert_array_equal(f.forward(np.ones((2, 4))), np.zeros((2, 4)))
    x = np.array([[2.0, 3.0, -1.0, 0.5]])
    np.testing.assert_array_equal(f.forward(x), [[10 * (3 - 4), 1 - 2, 10 * (0.5 - 1), 2]])
    expected = np.array([[-40.0, 10, 0, 0], [-1, 0, 0, 0], [0, 0, 20, 10], [0, 0, -1, 0]])
    np.testing.assert_array_equal(f.jacobian(x, "rev")[1][0], expected)
    np.testing.assert_array_equal(f.jacobian(x, "fwd")[1][0], expected)


def test_rosenbrock_validation() -> None:
    with pytest.raises(ValidationError, match="even"):
        build_function({"kind": "rosenbrock", "dim": 5})
    with pytest.raises(ValidationError):
        build_function({"kind": "rosenbrock", "dim": 0})
    with pytest.raises(ValueError, match="even"):
        Rosenbrock(3)


# ---- registry and documentation --------------------------------------------------------------


def test_builtins_are_registered_and_documented() -> None:
    registered = kinds()
    for kind, cls in [("mlp", MLP), ("linear", Linear), ("rosenbrock", Rosenbrock), ("lorenz96", Lorenz96)]:
        assert registered[kind] is cls
        assert cls.description and "\n" not in cls.description
        fields = cls.spec_model.model_fields
        for name, field in fields.items():
            if name not in ("kind", "dtype"):
                assert field.description, f"{kind}.{name} lacks a description"
        assert fields["kind"].default == kind


def test_design_quickstart_spec() -> None:
    f = build_function({"kind": "mlp", "sizes": [4, 8, 2], "seed": 0})
    x = np.zeros((3, 4))
    y, xbar = f.vjp(x, np.ones((3, 2)))
    assert y.shape == (3, 2) and xbar.shape == (3, 4)


def _vjp_in_child(queue) -> None:  # a forked child: runs the kernel on two kernel threads
    from jacrun.functions.parallel import blas_limit

    f = MLP.random([64, 256, 256, 8], seed=0)
    x = np.random.default_rng(0).standard_normal((2000, 64))
    with blas_limit(2):
        queue.put(float(np.abs(f.vjp(x, np.ones((2000, 8)))[1]).sum()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernel_threads_work_in_a_forked_child() -> None:
    """The parent's kernel-thread pool does not survive fork; the child must start its own
    (a stale pool would hang the child's first kernel)."""
    import multiprocessing

    from jacrun.functions.parallel import blas_limit, kernel_threads

    f = MLP.random([64, 256, 256, 8], seed=0)
    x = np.random.default_rng(0).standard_normal((2000, 64))
    with blas_limit(2):
        if kernel_threads() < 2:
            pytest.skip("BLAS runs one thread here: no kernel threads to test")
        expected = float(np.abs(f.vjp(x, np.ones((2000, 8)))[1]).sum())  # the parent's pool starts
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_vjp_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in its kernel")
    assert child.exitcode == 0 and queue.get(timeout=5) == pytest.approx(expected, rel=1e-12)
