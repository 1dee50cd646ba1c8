"""``autodiff: fd``: finite differences and the complex step of plain NumPy functions.

In process: every mode against exact Jacobians (a tridiagonal function, float64) in all three
methods, against SciPy's ``approx_derivative`` (the same steps, so the same numbers), bounds,
batching, the planner's notes and memory, colourings against SciPy's ``group_columns``, and
``jacrun check``'s comparison of methods. Through the real CLI on the session's cluster: a
sparse job killed part way and resumed, a dense one, and a jvp job through ``jacrun.submit``.
Bad input is in the corpus of tests/bad_configs (fd_*.yaml).
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from scipy.optimize._numdiff import approx_derivative, group_columns
from typer.testing import CliRunner

import jacrun
from jacrun.checks import TOLERANCES, check_spec
from jacrun.cli import app
from jacrun.config import config_from_dict
from jacrun.functions import build_function
from jacrun.functions.adapters.fd import FDFunction, complex_problem
from jacrun.functions.parallel import blas_limit
from jacrun.functions.targets import resolve_target
from jacrun.prepare import prepare
from jacrun.sparsity import choose
from jacrun.store import read_attrs
from tests import fd_targets
from tests.fd_targets import chain, chain_jacobian, tridiagonal
from tests.helpers import (  # noqa: F401 - fresh_targets: an autouse fixture
    REPO,
    fresh_targets,
    job_config,
    markers_done,
    rel_err,
    run_cli,
    start_submit,
    wait_for_markers,
    write_config,
)

N = 8
METHODS = ("forward", "central", "complex")
ACCURACY = {"forward": 1e-6, "central": 1e-8, "complex": 1e-13}
"""Relative error against the exact Jacobian (the issue's bounds, float64)."""
SCIPY = {"forward": "2-point", "central": "3-point", "complex": "cs"}


def section(target: str, **extra) -> dict:
    return {"kind": "python", "autodiff": "fd", "target": f"tests.fd_targets:{target}", **extra}


def batched(method: str, **fd) -> FDFunction:
    spec = section("make_chain", params={"n": N}, batched=True, fd={"method": method, **fd})
    return build_function(spec)


def inputs(samples: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.5, 1.5, (samples, N))


def dense(sparse, values: np.ndarray) -> np.ndarray:
    return np.stack([sparse.csr(v).toarray() for v in values])


# ---- every mode against the exact Jacobian ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_mode_matches_the_exact_jacobian(method: str) -> None:
    f = batched(method)
    per_sample = build_function(section("chain_one", n_in=N, fd={"method": method}))
    x = inputs()
    exact = chain_jacobian(x)
    rng = np.random.default_rng(1)
    t, v = rng.standard_normal((7, 3, N)), rng.standard_normal((7, 3, N))
    shared = np.broadcast_to(rng.standard_normal((3, N)), (7, 3, N))

    y, jac = f.jacobian(x)
    assert rel_err(jac, exact) < ACCURACY[method] and rel_err(y, chain(x)) == 0
    sparse = choose(f.sparsity(), "fwd", "declared")
    y_sparse, values = sparse.evaluate(f, x)
    assert rel_err(dense(sparse, values), exact) < ACCURACY[method]
    np.testing.assert_array_equal(dense(sparse, values), jac)  # the same steps: the same numbers
    for tangents in (t, shared):
        _, jt = f.jvp(x, tangents)
        assert rel_err(jt, np.einsum("bmn,bkn->bkm", exact, tangents)) < ACCURACY[method]
    _, vj = f.vjp(x, v)  # through the declared pattern's 3 colours
    _, vj_columns = per_sample.vjp(x, v)  # through one direction per input
    expected = np.einsum("bkm,bmn->bkn", v, exact)
    assert rel_err(vj, expected) < ACCURACY[method] and rel_err(vj_columns, expected) < ACCURACY[method]
    np.testing.assert_array_equal(batched(method, call_memory="1KiB").vjp(x, v)[1], vj)  # ranges of samples
    # the slow path computes the same numbers, f called per perturbed sample
    np.testing.assert_array_equal(per_sample.jacobian(x)[1], jac)
    np.testing.assert_array_equal(per_sample.jvp(x, t)[1], f.jvp(x, t)[1])
    # the dot-product test: <v, J t> = <J^T v, t> to the method's accuracy
    _, jt = f.jvp(x, t)
    left, right = np.einsum("bkm,bkm->bk", v, jt), np.einsum("bkn,bkn->bk", vj, t)
    assert np.max(np.abs(left - right)) < ACCURACY[method] * np.max(np.abs(left))


@pytest.mark.parametrize("method", METHODS)
def test_the_same_numbers_as_scipy_approx_derivative(method: str) -> None:
    """Dense and with SciPy's sparsity: SciPy's steps, so the same numbers to rounding."""
    f = batched(method)
    sparse = choose(tridiagonal(N), "fwd", "file")
    x = inputs(4, seed=2)
    _, values = sparse.evaluate(f, x)
    _, jac = f.jacobian(x)
    one = lambda u: chain(u[None])[0]  # noqa: E731
    groups = group_columns(tridiagonal(N))
    for i in range(len(x)):
        theirs = approx_derivative(one, x[i], method=SCIPY[method])
        theirs_sparse = approx_derivative(one, x[i], method=SCIPY[method], sparsity=(tridiagonal(N), groups))
        assert rel_err(jac[i], theirs) <= 1e-15
        assert rel_err(dense(sparse, values[i : i + 1])[0], theirs_sparse.toarray()) <= 1e-15


@pytest.mark.parametrize("method", ["forward", "central"])
def test_bounded_steps_stay_in_the_domain_as_scipy_takes_them(method: str) -> None:
    """x on and next to both bounds: f (which raises outside [0, 1]) is never evaluated
    outside; Jacobians match SciPy's bounded differences, tangents split at the box's corners."""
    spec = section(
        "make_guarded",
        params={"lower": 0.0, "upper": 1.0},
        batched=True,
        n_in=N,
        fd={"method": method, "bounds": [0.0, 1.0]},
    )
    f = build_function(spec)
    x = np.random.default_rng(3).uniform(0, 1, (5, N))
    x[:, 0], x[:, 3], x[:, 5], x[1] = 1.0, 0.0, 1 - 1e-12, 0.0  # a whole sample in a corner
    sparse = choose(tridiagonal(N), "fwd", "file")
    _, values = sparse.evaluate(f, x)
    _, jac = f.jacobian(x)
    t = np.random.default_rng(4).standard_normal((5, 4, N))
    _, jt = f.jvp(x, t)
    exact = chain_jacobian(x)
    tolerance = 20 * ACCURACY[method]  # one-sided near a bound
    assert rel_err(dense(sparse, values), exact) < tolerance and rel_err(jac, exact) < tolerance
    assert rel_err(jt, np.einsum("bmn,bkn->bkm", exact, t)) < tolerance
    one = lambda u: chain(u[None])[0]  # noqa: E731
    for i in range(len(x)):
        theirs = approx_derivative(one, x[i], method=SCIPY[method], bounds=(0.0, 1.0))
        assert rel_err(jac[i][exact[i] != 0], theirs[exact[i] != 0]) < 1e-9
    (report,) = check_spec(spec, x)  # jacrun check's own perturbations stay inside too
    assert report.passed, report.to_dict()


def test_complex_step_is_exact_to_rounding_and_refused_where_f_breaks_it() -> None:
    x = inputs(5)
    _, jac = batched("complex").jacobian(x)
    assert rel_err(jac, chain_jacobian(x)) < 1e-15
    for target, why in (
        ("drops_imaginary", "drops the imaginary part"),
        ("with_conj", "differs from central"),
    ):
        f = build_function(section(target, batched=True, n_in=N))  # forward: fine
        assert why in complex_problem(f)
        with pytest.raises(jacrun.ConfigError, match=rf"^fd\.method: complex: .*{why}"):
            build_function(section(target, batched=True, n_in=N, fd={"method": "complex"}))
    assert complex_problem(batched("forward")) is None


# ---- batching and the planner -------------------------------------------------------------------


def test_f_is_called_on_all_samples_and_directions_at_once_in_slices() -> None:
    counter = fd_targets.Counter()
    common = {"n_in": N, "n_out": N, "dtype": np.dtype("float64"), "target": "counter"}
    f = FDFunction(counter, batched=True, method="central", **common)
    x, t = inputs(50), np.random.default_rng(0).standard_normal((50, 4, N))
    with blas_limit(1):  # one kernel thread, as on a worker
        f.jvp(x, t)
    assert counter.rows == [50 * (1 + 4 * 2)]  # f(x) and both points of every tangent: one call
    counter.rows.clear()
    small = FDFunction(counter, batched=True, method="central", call_memory=4096, **common)
    with blas_limit(1):
        small.jvp(x, t)
    row = 2 * N * 8  # a perturbed row and its output
    assert max(counter.rows) * row <= 4096 and sum(counter.rows) == 50 * 9 and len(counter.rows) == 17
    counter.rows.clear()
    sparse = choose(tridiagonal(N), "fwd", "file")
    tiny = FDFunction(counter, batched=True, method="central", call_memory=3 * row, **common)
    with blas_limit(1):
        _, values = sparse.evaluate(tiny, x)  # one colour of one sample per call, then one gather
    assert max(counter.rows) == 3 and sum(counter.rows) == 50 * (1 + 3 * 2)
    np.testing.assert_array_equal(values, sparse.evaluate(f, x)[1])
    counter.rows.clear()
    slow = FDFunction(counter, batched=False, method="forward", **common)
    slow.jvp(x[:3], t[:3])
    assert counter.rows == [1] * 3 * (1 + 4)  # the slow path: one call per perturbed sample


def job(tmp_path, mode: str = "jacobian", **function):
    fd_function = section("make_chain", params={"n": 200}, batched=True, **function)
    config = job_config(function=fd_function, mode=mode, inputs={"kind": "random", "samples": 500})
    if mode == "jacobian":
        config.pop("vectors")
    return config_from_dict(config, tmp_path)


def test_the_plan_counts_the_perturbed_copies_and_says_what_fd_costs(tmp_path) -> None:
    small, large = (prepare(job(tmp_path, fd={"call_memory": size})) for size in ("64KiB", "8MiB"))
    assert small.plan.nnz == 598 and small.plan.vectors == 3 and small.plan.strategy == "fwd"
    assert not small.plan.warnings

    def call_bytes(prepared) -> int:  # one call's perturbed points and outputs (1 + 3 colours)
        span = min(prepared.plan.samples_per_block, prepared.sparse.kernel_rows(8))
        samples, colours = prepared.function.spans(span, 3)
        return samples * (1 + colours) * 400 * 8

    assert call_bytes(large) > 4 * call_bytes(small)
    grown = large.plan.memory_per_block - small.plan.memory_per_block
    assert grown >= 4 * (call_bytes(large) - call_bytes(small))  # f's temporaries: 3 more copies

    vjp = prepare(job(tmp_path, "vjp"), calibrate=False).plan
    assert any("3 directions (the colours of f's declared pattern)" in w for w in vjp.warnings)
    per_sample = section("chain_one", n_in=200)
    slow = config_from_dict(
        job_config(function=per_sample, inputs={"kind": "random", "samples": 50}), tmp_path
    )
    notes = " ".join(prepare(slow, calibrate=False).plan.warnings)
    assert "the slow path" in notes and "n = 200 directions, 200 evaluations of f per sample" in notes
    assert "mode: jacobian with a sparsity pattern" in notes
    dense = job_config(
        function=per_sample, mode="jacobian", vectors=None, inputs={"kind": "random", "samples": 50}
    )
    notes = " ".join(prepare(config_from_dict(dense, tmp_path), calibrate=False).plan.warnings)
    assert "a dense fd Jacobian takes n = 200 directions" in notes
    with pytest.raises(jacrun.ConfigError, match="strategy: rev needs a reverse mode"):
        prepare(job(tmp_path).model_copy(update={"strategy": "rev"}), calibrate=False)
    # a pattern file: columns, although its symmetric pattern colours rows as well for autodiff
    sp.save_npz(tmp_path / "pattern.npz", sp.csr_matrix(tridiagonal(200)))
    from_file = job_config(
        function=per_sample, mode="jacobian", vectors=None, sparsity={"file": "pattern.npz"}
    )
    sparse = prepare(config_from_dict(from_file, tmp_path), calibrate=False).sparse
    assert sparse.source == "file" and sparse.direction == "fwd" and sparse.n_colours == 3


@pytest.mark.parametrize("grid", [8, 16, 32])
def test_colourings_never_need_more_colours_than_scipy_group_columns(grid: int) -> None:
    """The 9-point stencil in 9 colours (SciPy: 16-18 groups), and a 5-point stencil, bands
    and random patterns, never more than SciPy's groups."""
    nine = resolve_target("stencil9:pattern", REPO / "examples" / "fd_fn")(grid)
    assert choose(nine, "fwd", "file").n_colours == 9 < group_columns(nine).max() + 1
    rng = np.random.default_rng(grid)
    five = sp.csr_array(
        sp.kron(tridiagonal(grid), sp.eye_array(grid)) + sp.kron(sp.eye_array(grid), tridiagonal(grid))
    )
    band = sp.csr_array(
        sp.diags_array([np.ones(grid * 4 - abs(k)) for k in range(-3, 4)], offsets=list(range(-3, 4)))
    )
    for matrix in (five, band, sp.random_array((grid * 4, grid * 3), density=0.05, rng=rng)):
        pattern_ = sp.csr_array(matrix != 0)
        assert choose(pattern_, "fwd", "file").n_colours <= group_columns(pattern_).max() + 1


# ---- jacrun check: the methods compared ---------------------------------------------------------


def test_check_reports_the_estimated_error_of_each_method() -> None:
    x = np.random.default_rng(0).uniform(-1, 1, (4, N))
    (report,) = check_spec(section("make_chain", params={"n": N}, batched=True), x)
    rows = {row.name: row for row in report.rows}
    assert report.passed and "finite_differences" not in rows
    assert 1e-10 < rows["fd_forward"].error < 1e-6 < TOLERANCES["float64"]["fd_forward"]
    assert rows["fd_central"].error < 1e-9 and rows["fd_complex"].error < 1e-14
    assert rows["fd_central"].tolerance == np.inf and "for comparison" in rows["fd_central"].detail
    (no_complex,) = check_spec(section("drops_imaginary", n_in=N, batched=True, fd={"method": "central"}), x)
    names = [row.name for row in no_complex.rows]
    assert "fd_complex" not in names and "Richardson" in no_complex.rows[names.index("fd_central")].detail
    (coarse,) = check_spec(section("make_chain", params={"n": N}, batched=True, fd={"step": 0.1}), x)
    assert not coarse.passed and not next(row for row in coarse.rows if row.name == "fd_forward").passed


# ---- jobs on the session's cluster --------------------------------------------------------------


def cli_job(tmp_path, method: str, samples: int, sparsity: str | None, delay: float = 0.0) -> dict:
    function = section(
        "make_chain", params={"n": N, "delay": delay}, batched=True, fd={"method": method}, path=str(REPO)
    )
    config = job_config(
        mode="jacobian",
        vectors=None,
        function=function,
        inputs={"kind": "random", "samples": samples, "seed": 1},
        chunks={"samples": 10},
        output={"store": "out.zarr"},
    )
    if sparsity:
        config["sparsity"] = sparsity
    return config


def stored_jacobians(store, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(the store's Jacobians as dense arrays, the exact ones at its inputs)."""
    config = jacrun.load_config(store.parent / "job.yaml")
    x = prepare(config, calibrate=False).inputs.read(0, samples, np.dtype("float64"))
    ds = jacrun.load(store)
    got = (
        jacrun.jacobians(store, 0, samples, dense=True)
        if "nonzero" in ds.jacobian.dims
        else ds.jacobian.values
    )
    return got, chain_jacobian(x)


def test_a_sparse_fd_job_killed_part_way_resumes_through_the_cli(tmp_path, scheduler_address) -> None:
    config = write_config(tmp_path, cli_job(tmp_path, "central", 200, "auto", delay=0.1))
    store = tmp_path / "out.zarr"
    proc = start_submit(config, "--scheduler", scheduler_address, "--quiet")
    try:
        partial = wait_for_markers(store, 3, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 1 <= partial < 20, "the job ended before it could be killed"
    done = run_cli("submit", str(config), "--scheduler", scheduler_address, "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert markers_done(store) == 20
    attrs = read_attrs(store)
    assert attrs["sparsity"]["colours"] == 3 and attrs["sparsity"]["mode"] == "fwd"
    assert attrs["function"]["fd"]["method"] == "central"
    assert attrs["function"]["fd"]["relative_step"] == pytest.approx(np.finfo(float).eps ** (1 / 3))
    got, exact = stored_jacobians(store, 200)
    assert rel_err(got, exact) < ACCURACY["central"]


def test_a_dense_fd_job_through_the_cli(tmp_path, scheduler_address) -> None:
    config = write_config(tmp_path, cli_job(tmp_path, "forward", 30, "dense"))
    plan = CliRunner().invoke(app, ["plan", str(config)])
    assert (
        plan.exit_code == 0 and "dense (fwd)" in plan.stdout and "finite differences (forward)" in plan.stdout
    )
    done = run_cli("submit", str(config), "--scheduler", scheduler_address, "--check", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = CliRunner().invoke(app, ["show", str(tmp_path / "out.zarr")])
    assert "finite differences (forward): relative step sqrt(eps)" in shown.stdout
    checks = read_attrs(tmp_path / "out.zarr")["checks"]  # submit --check: the methods
    assert (
        checks["passed"] and 1e-10 < checks["worst"]["fd_forward"] < 1e-6 and "fd_central" in checks["worst"]
    )
    got, exact = stored_jacobians(tmp_path / "out.zarr", 30)
    assert got.shape == (30, N, N) and rel_err(got, exact) < ACCURACY["forward"]


def test_a_complex_step_jvp_job(tmp_path, scheduler_address) -> None:
    config = job_config(
        mode="jvp",
        function=section("make_chain", params={"n": N}, batched=True, fd={"method": "complex"}),
        vectors={"kind": "random", "count": 3, "seed": 2},
        inputs={"kind": "random", "samples": 40, "seed": 1},
        chunks={"samples": 16},
    )
    cfg = config_from_dict(config, tmp_path)
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert summary.ok, summary.failures
    job_ = prepare(cfg, calibrate=False)
    x, t = job_.inputs.read(0, 40, np.dtype("float64")), job_.vectors.read(0, 40, 0, 3, np.dtype("float64"))
    got = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["jvp"][...]
    assert rel_err(got, np.einsum("bmn,bkn->bkm", chain_jacobian(x), t)) < ACCURACY["complex"]


def test_the_example_is_a_valid_sparse_fd_job() -> None:
    cfg = jacrun.load_config(REPO / "examples" / "fd_fn" / "job.yaml")
    job_ = prepare(cfg, calibrate=False)
    assert cfg.function.autodiff == "fd" and cfg.function.fd.method == "forward"
    assert job_.sparse.n_colours == 9 and job_.sparse.direction == "fwd" and job_.sparse.source == "declared"
    assert job_.plan.memory_per_block <= job_.plan.task_memory and not job_.plan.warnings
