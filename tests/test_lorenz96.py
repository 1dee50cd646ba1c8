"""Lorenz-96: the flow map against a plain reference integration, the tangent-linear model
against finite differences of that reference, the adjoint against the tangent-linear model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jacrun.functions import build_function
from jacrun.functions.linear import ufunc_buffer_bytes
from jacrun.functions.lorenz96 import Lorenz96
from tests.test_functions import measured_peaks

SPEC = {"kind": "lorenz96", "dim": 40, "forcing": 8.0, "dt": 0.01, "steps": 100}


def reference_flow(x: np.ndarray, forcing: float, dt: float, steps: int) -> np.ndarray:
    """Textbook RK4 on one state at a time, cyclic shifts with np.roll."""

    def rhs(s: np.ndarray) -> np.ndarray:
        return (np.roll(s, -1) - np.roll(s, 2)) * np.roll(s, 1) - s + forcing

    out = np.empty_like(x)
    for i, s in enumerate(x):
        for _ in range(steps):
            k1 = rhs(s)
            k2 = rhs(s + dt / 2 * k1)
            k3 = rhs(s + dt / 2 * k2)
            k4 = rhs(s + dt * k3)
            s = s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[i] = s
    return out


def initial_states(batch: int, dim: int, seed: int = 0) -> np.ndarray:
    """States near the attractor's scale: F plus unit noise."""
    return 8.0 + np.random.default_rng(seed).standard_normal((batch, dim))


def dot_gap(v: np.ndarray, jt: np.ndarray, vj: np.ndarray, t: np.ndarray) -> float:
    """Worst per-vector |<v, J t> - <J^T v, t>|, relative to |v||Jt| + |J^T v||t|."""
    v, jt, vj, t = (a.astype(np.float64) for a in (v, jt, vj, t))
    gap = np.abs(np.einsum("...i,...i->...", v, jt) - np.einsum("...i,...i->...", vj, t))
    norm = np.linalg.norm
    scale = norm(v, axis=-1) * norm(jt, axis=-1) + norm(vj, axis=-1) * norm(t, axis=-1)
    return float(np.max(gap / scale))


def test_forward_matches_reference_integration() -> None:
    f = build_function(SPEC)
    x = initial_states(3, 40)
    expected = reference_flow(x, 8.0, 0.01, 100)
    np.testing.assert_allclose(f.forward(x), expected, rtol=1e-12, atol=1e-12)
    assert not np.allclose(expected, x, atol=1.0)  # it really moved


@pytest.mark.parametrize("k", [1, 3])
def test_jvp_matches_central_differences_of_reference(k: int) -> None:
    f = build_function(SPEC)
    x = initial_states(2, 40, seed=1)
    t = np.random.default_rng(2).standard_normal((2, k, 40))
    _, jt = f.jvp(x, t)
    h = 1e-6 * np.linalg.norm(x, axis=-1)[:, None, None] / np.linalg.norm(t, axis=-1, keepdims=True)
    plus = reference_flow((x[:, None] + h * t).reshape(-1, 40), 8.0, 0.01, 100)
    minus = reference_flow((x[:, None] - h * t).reshape(-1, 40), 8.0, 0.01, 100)
    fd = (plus - minus).reshape(2, k, 40) / (2 * h)
    err = np.linalg.norm(fd - jt, axis=-1) / np.linalg.norm(jt, axis=-1)
    assert np.max(err) < 1e-6


@pytest.mark.parametrize("batch,k", [(1, 1), (1, 3), (5, 1), (5, 3), (50, 3)])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_adjoint_passes_dot_product_test(dtype: str, tol: float, batch: int, k: int) -> None:
    f = build_function({**SPEC, "dtype": dtype})
    rng = np.random.default_rng(3)
    x = initial_states(batch, 40, seed=4).astype(dtype)
    v = rng.standard_normal((batch, k, 40)).astype(dtype)
    t = rng.standard_normal((batch, k, 40)).astype(dtype)
    y1, vj = f.vjp(x, v)
    y2, jt = f.jvp(x, t)
    np.testing.assert_array_equal(y1, y2)
    assert vj.dtype == jt.dtype == np.dtype(dtype)
    assert dot_gap(v, jt, vj, t) < tol


def test_jacobian_rev_equals_fwd() -> None:
    f = build_function(SPEC)
    x = initial_states(4, 40, seed=5)
    _, j_rev = f.jacobian(x, "rev")
    _, j_fwd = f.jacobian(x, "fwd")
    assert np.max(np.abs(j_rev - j_fwd)) <= 1e-12 * np.max(np.abs(j_fwd))


def test_steps_compose_with_the_chain_rule() -> None:
    """f_{a+b} = f_b o f_a and J_{a+b}(x) = J_b(f_a(x)) J_a(x)."""
    x = initial_states(3, 8, seed=6)
    whole = Lorenz96(8, forcing=5.0, dt=0.02, steps=7)
    first = Lorenz96(8, forcing=5.0, dt=0.02, steps=3)
    second = Lorenz96(8, forcing=5.0, dt=0.02, steps=4)
    mid = first.forward(x)
    np.testing.assert_allclose(whole.forward(x), second.forward(mid), rtol=1e-13)
    chained = second.jacobian(mid, "fwd")[1] @ first.jacobian(x, "fwd")[1]
    np.testing.assert_allclose(whole.jacobian(x, "rev")[1], chained, rtol=1e-11, atol=1e-12)


def test_uniform_forcing_state_is_a_fixed_point() -> None:
    f = Lorenz96(10, forcing=3.0, dt=0.05, steps=20)
    x = np.full((2, 10), 3.0)
    np.testing.assert_allclose(f.forward(x), x, rtol=1e-14)
    # the linearisation there is the same constant-coefficient operator for every sample
    jac = f.jacobian(x, "rev")[1]
    np.testing.assert_allclose(jac[0], jac[1], rtol=1e-14)
    # and it commutes with the cyclic shift (the system is translation invariant)
    shift = np.roll(np.eye(10), 1, axis=0)
    np.testing.assert_allclose(shift @ jac[0], jac[0] @ shift, atol=1e-13)


@settings(max_examples=20, deadline=None)
@given(
    dim=st.integers(4, 12),
    steps=st.integers(1, 6),
    dt=st.floats(1e-3, 0.1),
    forcing=st.floats(-10, 10),
    batch=st.integers(1, 6),
    k=st.integers(1, 4),
)
def test_any_configuration(dim: int, steps: int, dt: float, forcing: float, batch: int, k: int) -> None:
    f = Lorenz96(dim, forcing, dt, steps)
    x = initial_states(batch, dim, seed=dim)
    rng = np.random.default_rng(steps)
    v, t = rng.standard_normal((2, batch, k, dim))
    np.testing.assert_allclose(f.forward(x), reference_flow(x, forcing, dt, steps), rtol=1e-12, atol=1e-12)
    assert dot_gap(v, f.jvp(x, t)[1], f.vjp(x, v)[1], t) < 1e-10


def test_shared_vectors_match_per_sample_copies() -> None:
    f = Lorenz96(12, steps=5)
    x = initial_states(6, 12, seed=7)
    vecs = np.random.default_rng(8).standard_normal((3, 12))
    shared = np.broadcast_to(vecs, (6, 3, 12))
    copies = np.ascontiguousarray(shared)
    np.testing.assert_array_equal(f.vjp(x, shared)[1], f.vjp(x, copies)[1])
    np.testing.assert_array_equal(f.jvp(x, shared)[1], f.jvp(x, copies)[1])


def test_work_bytes_counts_the_stored_stages() -> None:
    short = Lorenz96(40, steps=10)
    long = Lorenz96(40, steps=30)
    batch, k = 64, 4  # one chunk
    stages = 20 * 4 * batch * 43 * 8  # 20 more steps of 4 stored padded stage states
    assert long.work_bytes(batch, k, "vjp") - short.work_bytes(batch, k, "vjp") == stages
    assert long.work_bytes(batch, k, "jvp") == short.work_bytes(batch, k, "jvp")
    assert short.work_bytes(batch, k, "vjp") > 10 * 4 * batch * 43 * 8
    single = Lorenz96(40, steps=10, dtype="float32")
    assert single.work_bytes(batch, k, "vjp") < short.work_bytes(batch, k, "vjp")
    assert long.flops(batch, k, "vjp") == pytest.approx(3 * short.flops(batch, k, "vjp"))


def test_work_is_bounded_by_chunks() -> None:
    """The batch runs in chunks of samples: the stored stages are per chunk, so the work stops
    growing with the batch, and more vectors per sample mean fewer samples per chunk."""
    f = Lorenz96(40, steps=100)
    assert f.work_bytes(10**6, 1, "vjp") == f.work_bytes(10**4, 1, "vjp") > f.work_bytes(64, 1, "vjp")
    assert f.work_bytes(10**6, 8, "vjp") < f.work_bytes(10**6, 1, "vjp")
    x = initial_states(3000, 40, seed=9)  # several chunks, the last one partial
    v = np.random.default_rng(10).standard_normal((3000, 2, 40))
    y, vj = f.vjp(x, v)
    y_rows, vj_rows = zip(*(f.vjp(x[i : i + 1], v[i : i + 1]) for i in (0, 1234, 2999)), strict=True)
    np.testing.assert_allclose(y[[0, 1234, 2999]], np.concatenate(y_rows), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(vj[[0, 1234, 2999]], np.concatenate(vj_rows), rtol=1e-13, atol=1e-13)


def test_work_bytes_is_the_measured_peak() -> None:
    """A first call allocates exactly the modelled work buffers (plus its results and, at most,
    the ufunc buffers); a second call on the same instance allocates only its results."""
    spec = {"kind": "lorenz96", "dim": 40, "steps": 5}
    cases = [
        {
            "spec": {**spec, "dtype": dtype},
            "mode": mode,
            "shared": False,
            "k": 3,
            "batch": 2000,
            "seed": 0,
            "offset": 8.0,
        }
        for dtype in ("float64", "float32")
        for mode in ("vjp", "jvp")
    ]
    for case, m in zip(cases, measured_peaks(cases), strict=True):
        allowance = ufunc_buffer_bytes(np.dtype(case["spec"]["dtype"]))
        buffers = m["model"] - allowance
        returned = m["y"] + m["result"]
        slack = 16 * 1024
        assert buffers - slack <= m["held"] <= buffers + slack, case
        assert buffers + returned - slack <= m["peak"] <= buffers + returned + allowance + slack, case
        assert returned - slack <= m["again"] <= returned + allowance + slack, case


def test_spec_defaults_and_validation() -> None:
    f = build_function({"kind": "lorenz96", "dim": 5})
    assert isinstance(f, Lorenz96)
    assert (f.n_in, f.n_out, f.forcing, f.dt, f.steps) == (5, 5, 8.0, 0.01, 1)
    for bad in ({"dim": 3}, {"dim": 5, "dt": 0}, {"dim": 5, "steps": 0}, {"dim": 5, "dt": -1.0}):
        with pytest.raises(ValidationError):
            build_function({"kind": "lorenz96", **bad})
    with pytest.raises(ValueError, match="dim"):
        Lorenz96(2)
    with pytest.raises(ValueError, match="dt"):
        Lorenz96(8, dt=float("nan"))
