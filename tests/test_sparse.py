"""Sparse Jacobians: patterns, colourings, compressed products, the planner, the store, the CLI."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import jacrun
from jacrun.config import config_from_dict
from jacrun.functions import bratu as bratu_module
from jacrun.functions import build_function
from jacrun.functions.parallel import blas_limit
from jacrun.prepare import prepare, resolve_sparsity
from jacrun.runner import open_output
from jacrun.sparsity import SparseJacobian, as_pattern, choose, colouring, conflict_graph
from tests.helpers import (  # noqa: F401 - fresh_targets: an autouse fixture
    fresh_targets,
    kill_part_way,
    markers_done,
    one_error_line,
    run_cli,
    valid_colouring,
    write_config,
)

# ---- patterns and colourings ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("direction", ["fwd", "rev"])
def test_colourings_of_random_patterns_are_valid(seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    pattern = as_pattern(sp.random_array((40, 30), density=0.08, rng=rng), (40, 30))
    colours = colouring(pattern, direction)
    assert valid_colouring(pattern, colours, direction)
    graph = conflict_graph(pattern, direction)
    assert colours.max() + 1 <= np.diff(graph.indptr).max(initial=0) + 1  # greedy bound


@pytest.mark.parametrize("grid", [3, 8, 32])
def test_the_five_point_stencil_takes_five_colours(grid: int) -> None:
    bratu = build_function({"kind": "bratu", "grid": grid})
    sparse = choose(bratu.sparsity(), "auto", "declared")
    assert sparse.n_colours == 5
    assert valid_colouring(sparse.pattern(), sparse.colours, sparse.direction)


def test_no_more_colours_than_asdex_on_the_bench_patterns() -> None:
    asdex = pytest.importorskip("asdex")
    for grid in (8, 32, 64):
        pattern = build_function({"kind": "bratu", "grid": grid}).sparsity().tocoo()
        theirs = asdex.SparsityPattern.from_coo(
            pattern.row.astype(np.int32), pattern.col.astype(np.int32), pattern.shape
        )
        _, their_rows = asdex.color_rows(theirs)
        ours = choose(pattern, "auto", "declared").n_colours
        assert ours <= their_rows, (grid, ours, their_rows)


SPECS = [
    {"kind": "bratu", "grid": 6},
    {"kind": "rosenbrock", "dim": 8},
    {"kind": "lorenz96", "dim": 30, "steps": 1},
    {"kind": "lorenz96", "dim": 30, "steps": 2, "dt": 0.05},
    {"kind": "lorenz96", "dim": 12, "steps": 3},  # fills in: dense
    {"kind": "linear", "n_in": 5, "n_out": 3},
    {"kind": "mlp", "sizes": [4, 8, 3]},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_declared_patterns_are_exactly_the_nonzeros_of_the_dense_jacobian(spec) -> None:
    f = build_function(spec)
    x = np.random.default_rng(0).uniform(-1, 1, (4, f.n_in))
    _, dense = f.jacobian(x)
    nonzero = (dense != 0).any(axis=0)
    declared = f.sparsity()
    if isinstance(declared, str):  # "dense": every entry, with no m x n pattern built
        assert declared == "dense" and nonzero.all()
    else:
        assert (as_pattern(declared, (f.n_out, f.n_in)).toarray() == nonzero).all()


def test_linear_declares_the_pattern_of_its_matrix() -> None:
    matrix = np.array([[1.0, 0, 2], [0, 0, 3]])
    f = build_function({"kind": "linear", "n_in": 3, "n_out": 2})
    f = type(f)(matrix)
    np.testing.assert_array_equal(f.sparsity().toarray(), matrix != 0)


# ---- compressed products -------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("strategy", ["auto", "fwd", "rev"])
@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: "-".join(map(str, s.values())))
def test_nonzeros_equal_the_dense_jacobian(spec, strategy: str, threads: int) -> None:
    f = build_function(spec)
    sparse = choose(f.sparsity(), strategy, "declared")
    x = np.random.default_rng(1).uniform(-1, 1, (37, f.n_in))
    with blas_limit(threads):
        y, values = sparse.evaluate(f, x)
    y_dense, dense = f.jacobian(x)
    np.testing.assert_allclose(y, y_dense, rtol=0, atol=1e-14)
    got = np.stack([sparse.csr(v).toarray() for v in values])
    assert np.max(np.abs(got - dense)) <= 1e-12 * np.max(np.abs(dense))
    np.testing.assert_array_equal(sparse.gather(sparse_products(f, sparse, x)), values)


def sparse_products(f, sparse: SparseJacobian, x: np.ndarray) -> np.ndarray:
    seeds = sparse.seeds(0, sparse.n_colours, f.dtype)
    kernel = f.jvp_batch if sparse.direction == "fwd" else f.vjp_batch
    return kernel(x, np.broadcast_to(seeds, (x.shape[0], *seeds.shape)))[1]


def test_float32_nonzeros_match_float64() -> None:
    f64 = build_function({"kind": "bratu", "grid": 9})
    f32 = build_function({"kind": "bratu", "grid": 9, "dtype": "float32"})
    sparse = choose(f64.sparsity(), "auto", "declared")
    x = np.random.default_rng(2).uniform(-1, 1, (5, f64.n_in))
    _, v64 = sparse.evaluate(f64, x)
    _, v32 = sparse.evaluate(f32, x.astype(np.float32))
    assert v32.dtype == np.float32
    np.testing.assert_allclose(v32, v64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [1, 2, 3, 10])
def test_bratu_stencil_is_the_five_point_matrix(grid: int) -> None:
    """The flat shifts that cross grid rows put those entries back: A t exactly, batched."""
    from jacrun.functions.bratu import stencil

    laplacian_1d = sp.diags_array(
        [-np.ones(grid - 1), 2 * np.ones(grid), -np.ones(grid - 1)], offsets=[-1, 0, 1]
    )
    eye = sp.eye_array(grid)
    matrix = (sp.kron(laplacian_1d, eye) + sp.kron(eye, laplacian_1d)).toarray()
    t = np.random.default_rng(3).normal(size=(2, 3, grid * grid))
    got = stencil(t, np.empty_like(t), grid)
    np.testing.assert_allclose(got, t @ matrix.T, rtol=0, atol=1e-13)


def bratu_generic_nonzeros(f, sparse: SparseJacobian, x: np.ndarray) -> np.ndarray:
    """Bratu's nonzeros the way any function gets them: its kernel on the seeds, then the gather."""
    out = np.empty((x.shape[0], sparse.nnz), f.dtype)
    sparse.gather_products(f, x, out)
    return out


@pytest.mark.parametrize("rows", ["range", "row"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("strategy", ["fwd", "rev"])
@pytest.mark.parametrize(
    "edit", ["declared", "missing diagonal", "extra entries"], ids=lambda e: e.replace(" ", "-")
)
def test_bratu_forms_the_gathered_products_bit_for_bit(
    edit: str, strategy: str, dtype: str, rows: str, monkeypatch
) -> None:
    """Bratu writes gather(A S) - c at gather(S) = 1 instead of computing J(x) S: the same
    bits as its kernels and the gather, for any colouring (a pattern that misses diagonal
    entries sends c to other positions, which is what the products would have done too),
    writing a whole range of rows at once or one row at a time (as large grids do)."""
    if rows == "row":
        monkeypatch.setattr(bratu_module, "WHOLE_RANGE_BYTES", 0)
    f = build_function({"kind": "bratu", "grid": 8, "dtype": dtype})
    pattern = f.sparsity().tolil()
    if edit == "missing diagonal":
        for i in (0, 9, 30, 63):
            pattern[i, i] = False
    elif edit == "extra entries":
        pattern[0, 63] = pattern[40, 2] = pattern[5, 5 + 16] = True
    sparse = choose(sp.csr_array(pattern), strategy, "file")
    x = np.random.default_rng(4).uniform(-1, 2, (23, f.n_in)).astype(dtype)
    with blas_limit(2):
        y, values = sparse.evaluate(f, x)
    assert values.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(values, bratu_generic_nonzeros(f, sparse, x))
    np.testing.assert_array_equal(y, f.forward_batch(x))
    parts = f._coloured_parts(sparse)
    assert (parts.columns is None) == (edit != "missing diagonal")
    assert parts.fill == (None if edit == "extra entries" else -1.0)  # their 0s: gather(A S) is copied


@pytest.mark.parametrize("rows", ["range", "row"])
def test_bratu_keeps_true_entries_where_exp_overflows(rows: str, monkeypatch) -> None:
    """Where exp(u) is inf the products give NaN for the whole column (inf * 0); the direct
    nonzeros keep the column's -1s and put -inf on the diagonal only."""
    if rows == "row":
        monkeypatch.setattr(bratu_module, "WHOLE_RANGE_BYTES", 0)
    f = build_function({"kind": "bratu", "grid": 3})
    sparse = choose(f.sparsity(), "rev", "declared")
    x = np.zeros((2, 9))
    x[1, 4] = 800.0  # the centre cell: exp overflows
    with np.errstate(over="ignore", invalid="ignore"):
        _, values = sparse.evaluate(f, x)
        products = bratu_generic_nonzeros(f, sparse, x)
    np.testing.assert_array_equal(values[0], products[0])
    finite = np.isfinite(products[1])
    np.testing.assert_array_equal(values[1][finite], products[1][finite])
    centre = sparse.csr(values[1]).toarray()[:, 4]
    assert centre[4] == -np.inf and (centre[[1, 3, 5, 7]] == -1).all()
    assert np.count_nonzero(~np.isfinite(values[1])) == 1 < np.count_nonzero(~finite)


def test_a_sparse_nonzeros_that_returns_no_outputs_is_an_error() -> None:
    f = build_function({"kind": "bratu", "grid": 4})
    sparse = choose(f.sparsity(), "auto", "declared")
    f.sparse_nonzeros = lambda x, sparse, out, outputs=True: None  # forgets y
    with pytest.raises(TypeError, match="returned no y"):
        sparse.evaluate(f, np.zeros((3, 16)))
    assert sparse.evaluate(f, np.zeros((3, 16)), outputs=False)[0] is None


def test_bratu_skips_its_outputs_only_when_asked() -> None:
    f = build_function({"kind": "bratu", "grid": 6})
    sparse = choose(f.sparsity(), "auto", "declared")
    x = np.random.default_rng(5).uniform(-1, 1, (9, f.n_in))
    y, values = sparse.evaluate(f, x, outputs=False)
    assert y is None
    np.testing.assert_array_equal(values, sparse.evaluate(f, x)[1])
    rosenbrock = build_function({"kind": "rosenbrock", "dim": 6})
    other = choose(rosenbrock.sparsity(), "auto", "declared")
    y, values = other.evaluate(rosenbrock, x[:, :6], outputs=False)  # the kernel's y is dropped
    assert y is None
    np.testing.assert_array_equal(values, other.evaluate(rosenbrock, x[:, :6])[1])


def test_bratu_colouring_parts_follow_the_colouring() -> None:
    """A permuted colouring (a resumed store's) gets its own parts; the same one is reused."""
    f = build_function({"kind": "bratu", "grid": 6})
    sparse = choose(f.sparsity(), "auto", "declared")
    x = np.random.default_rng(6).uniform(-1, 1, (4, f.n_in))
    first = sparse.evaluate(f, x)[1]
    parts = f._coloured_parts(sparse)
    permuted = SparseJacobian.from_pattern(f.sparsity(), sparse.direction, (sparse.colours + 2) % 5)
    np.testing.assert_array_equal(permuted.evaluate(f, x)[1], first)
    assert f._coloured_parts(permuted) is not parts
    again = SparseJacobian.from_pattern(f.sparsity(), permuted.direction, permuted.colours)
    assert f._coloured_parts(again).base is f._coloured_parts(permuted).base


def test_sparse_work_counts_what_bratu_keeps(tmp_path) -> None:
    f = build_function({"kind": "bratu", "grid": 64})
    sparse = choose(f.sparsity(), "auto", "declared")
    kept = f.sparse_cache_bytes(sparse)
    assert kept >= sparse.nnz * 8 + f.n_in * 16
    rosenbrock = build_function({"kind": "rosenbrock", "dim": 64})
    assert rosenbrock.sparse_cache_bytes(choose(rosenbrock.sparsity(), "auto", "declared")) == 0
    assert sparse.work_bytes(f, 100) >= kept


# ---- config and plan -----------------------------------------------------------------------------


def bratu_job(store: str = "out.zarr", grid: int = 6, samples: int = 50, **extra) -> dict:
    return {
        "name": "sparse",
        "mode": "jacobian",
        "function": {"kind": "bratu", "grid": grid},
        "inputs": {"kind": "random", "samples": samples, "seed": 1, "distribution": "uniform"},
        "output": {"store": store},
        "chunks": {"samples": 16},
        "cluster": {"kind": "local", "workers": 1, "memory_limit": "1GiB", "dashboard": None},
        **extra,
    }


def test_auto_is_sparse_for_a_declared_pattern_that_saves_products(tmp_path) -> None:
    job = prepare(config_from_dict(bratu_job(), tmp_path), calibrate=False)
    plan = job.plan
    assert job.sparse is not None and plan.nnz == job.sparse.nnz == 156
    assert plan.vectors == plan.vectors_per_block == 5 and plan.grid == (4, 1)
    assert plan.result_shape == (50, 156) and plan.result_dims == ("sample", "nonzero")
    assert plan.sparsity.startswith("sparse (rev)") and "5 products per sample instead of 36" in plan.sparsity
    assert re.search(
        r"coloured in [0-9.e-]+ s by lattice \(i \+ 2j\) mod 5 on a 6 x 6 grid, optimal$", plan.sparsity
    )


@pytest.mark.parametrize(
    "function,why",
    [
        ({"kind": "mlp", "sizes": [4, 8, 3]}, "the declared pattern is dense"),
        ({"kind": "lorenz96", "dim": 12, "steps": 3}, "the declared pattern is dense"),
        ({"kind": "lorenz96", "dim": 14, "steps": 1}, "no fewer than the dense 14"),
    ],
)
def test_auto_stays_dense_when_sparsity_does_not_pay(tmp_path, function, why) -> None:
    job = prepare(config_from_dict(bratu_job(function=function), tmp_path), calibrate=False)
    assert job.sparse is None and job.plan.nnz is None and why in job.plan.sparsity


def test_a_dense_declared_pattern_builds_no_m_by_n_matrix(tmp_path) -> None:
    """`jacrun validate` of a 4096 x 4096 MLP's Jacobian: "dense" is declared, not a 16.8M-entry
    pattern (which cost 290 MB and seconds); the command's peak memory is its weights' and
    Python's, measured on the real process."""
    config = write_config(
        tmp_path,
        bratu_job(
            function={"kind": "mlp", "sizes": [4096, 4096], "seed": 0},
            inputs={"kind": "random", "samples": 4},
            chunks={"samples": 1, "vectors": 64},
        ),
    )
    # the command's own peak (VmHWM, read as it exits): a child's ru_maxrss would also count the
    # pages it shared with this (large) test process between fork and exec
    peak = "import atexit, sys; atexit.register(lambda: print(open('/proc/self/status').read(), file=sys.stderr))"
    command = (
        f"{peak}; from jacrun.cli import main; sys.argv = ['jacrun', 'validate', {str(config)!r}]; main()"
    )
    done = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "jacobian of mlp (4096 -> 4096)" in done.stdout, done.stdout + done.stderr
    kib = int(re.search(r"VmHWM:\s+(\d+) kB", done.stderr).group(1))
    weights = 4096 * 4096 * 8
    assert kib * 1024 < weights + 300 * 2**20, kib  # with the m x n pattern: over 600 MiB


def test_dense_setting_and_strategy_override(tmp_path) -> None:
    dense = prepare(config_from_dict(bratu_job(sparsity="dense"), tmp_path), calibrate=False)
    assert dense.sparse is None and dense.plan.result_shape == (50, 36, 36)
    fwd = prepare(config_from_dict(bratu_job(strategy="fwd"), tmp_path), calibrate=False)
    assert fwd.sparse.direction == "fwd" and fwd.plan.strategy == "fwd"


def test_plan_memory_counts_nonzeros_not_m_times_n(tmp_path) -> None:
    config = config_from_dict(bratu_job(grid=256, samples=2000, chunks={"samples": 32}), tmp_path)
    plan = prepare(config, calibrate=False).plan
    nonzeros = 32 * plan.nnz * 8
    assert nonzeros <= plan.memory_per_block < 7 * nonzeros  # dense would be 32 x 65536^2 x 8 bytes


def test_a_dense_jacobian_that_cannot_fit_suggests_sparsity(tmp_path) -> None:
    config = config_from_dict(
        bratu_job(grid=256, sparsity="dense", chunks={"samples": 64, "vectors": 4096}), tmp_path
    )
    with pytest.raises(jacrun.ConfigError, match="set sparsity"):
        prepare(config, calibrate=False)


def test_pattern_file_for_a_python_function(tmp_path) -> None:
    """Any function, kind: python included, takes its pattern from a file."""
    pattern = build_function({"kind": "rosenbrock", "dim": 6}).sparsity()
    sp.save_npz(tmp_path / "pattern.npz", sp.csr_matrix(pattern))
    spec = {"kind": "python", "target": "tests.plugins:WrongVJP", "params": {"n": 6}}
    config = config_from_dict(bratu_job(function=spec, sparsity={"file": "pattern.npz"}), tmp_path)
    job = prepare(config, calibrate=False)
    assert job.sparse.source == "file" and job.sparse.nnz == 9


# ---- bad input through the real command ----------------------------------------------------------


def test_bad_sparsity_inputs_are_one_line_exit_2(tmp_path) -> None:
    sp.save_npz(tmp_path / "wrong.npz", sp.csr_matrix(np.eye(5)))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    np.save(tmp_path / "dense.npy", np.eye(36))
    cases = {
        "wrong shape": (bratu_job(sparsity={"file": "wrong.npz"}), "sparsity.file: "),
        "unreadable": (bratu_job(sparsity={"file": "junk.npz"}), "sparsity.file: cannot read"),
        "not sparse": (bratu_job(sparsity={"file": "dense.npy"}), "sparsity.file: cannot read"),
        "missing": (bratu_job(sparsity={"file": "nope.npz"}), "sparsity.file: no such file"),
        "vjp": (
            bratu_job(mode="vjp", vectors={"kind": "ones"}, sparsity="auto"),
            "sparsity: only for mode jacobian",
        ),
        "detect without jax": (bratu_job(sparsity="detect"), "sparsity: detect works for kind: python"),
        "unknown": (bratu_job(sparsity="sometimes"), "sparsity"),
    }
    for name, (config, message) in cases.items():
        line = one_error_line(run_cli("validate", str(write_config(tmp_path, config, f"{name}.yaml"))))
        assert message in line and f"{name}.yaml:" in line, (name, line)
    assert not (tmp_path / "out.zarr").exists()


def test_check_catches_a_pattern_file_that_misses_a_nonzero(tmp_path) -> None:
    pattern = build_function({"kind": "bratu", "grid": 5}).sparsity().tolil()
    pattern[3, 4] = False  # a neighbour of 3 in the same grid row
    sp.save_npz(tmp_path / "short.npz", sp.csr_matrix(pattern.tocsr()))
    config = write_config(tmp_path, bratu_job(grid=5, sparsity={"file": "short.npz"}))
    result = run_cli("check", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sparse_jvp" in result.stderr and "sparse_vjp" in result.stderr
    sparse_report = jacrun.check_job(config)[-1]
    dense_row = next(row for row in sparse_report.rows if row.name == "sparse_dense")
    assert not dense_row.passed and "1 entries outside the pattern" in dense_row.detail


# ---- jobs on a real cluster ----------------------------------------------------------------------


def test_sparse_job_end_to_end_through_the_cli(tmp_path, scheduler_address) -> None:
    config = write_config(tmp_path, bratu_job(grid=7, samples=40, chunks={"samples": 16}))
    plan = run_cli("plan", str(config))
    assert plan.returncode == 0, plan.stderr
    assert (
        "sparse (rev)" in plan.stdout and "5 colours (rev)" in plan.stdout and "217 per sample" in plan.stdout
    )
    assert "coloured in" in plan.stdout and "optimal" in plan.stdout
    done = run_cli("submit", str(config), "--check", "--scheduler", scheduler_address)
    assert done.returncode == 0, done.stdout + done.stderr
    store = tmp_path / "out.zarr"
    shown = run_cli("show", str(store))
    assert "sparse Jacobian" in shown.stdout and "CSR (49 x 49)" in shown.stdout
    assert "sparse_jvp" in shown.stdout

    ds = jacrun.load(store)
    assert ds.jacobian.dims == ("sample", "nonzero") and ds.jacobian.shape == (40, 217)
    assert ds.indices.dims == ("nonzero",) and ds.indptr.shape == (50,)
    assert ds.attrs["jacrun"]["sparsity"]["colours"] == 5
    assert ds.attrs["jacrun"]["sparsity"]["colouring"] == "lattice (i + 2j) mod 5 on a 7 x 7 grid, optimal"
    f = build_function({"kind": "bratu", "grid": 7})
    cfg = jacrun.load_config(config)
    x = prepare(cfg, calibrate=False).inputs.read(0, 40, np.dtype("float64"))
    _, dense = f.jacobian(x)
    np.testing.assert_allclose(jacrun.jacobian(store, 17).toarray(), dense[17], rtol=0, atol=1e-12)
    np.testing.assert_allclose(jacrun.jacobians(store, 3, 9, dense=True), dense[3:9], rtol=0, atol=1e-12)
    batch = jacrun.jacobians(store, 30)
    assert batch.shape == (10, 49, 49) and batch.nnz == 10 * 217
    np.testing.assert_allclose(batch.todense(), dense[30:], rtol=0, atol=1e-12)
    with pytest.raises(jacrun.ConfigError, match="out of range"):
        jacrun.jacobian(store, 40)


def test_sparse_job_without_outputs_skips_them(tmp_path, scheduler_address) -> None:
    """save_outputs: false lets bratu skip y; the nonzeros are the same, the counts exclude y."""
    output = {"store": "out.zarr", "save_outputs": False}
    config = write_config(tmp_path, bratu_job(grid=5, samples=20, output=output, chunks={"samples": 8}))
    done = run_cli("submit", str(config), "--check", "--scheduler", scheduler_address)
    assert done.returncode == 0, done.stdout + done.stderr
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert "y" not in group
    f = build_function({"kind": "bratu", "grid": 5})
    x = prepare(jacrun.load_config(config), calibrate=False).inputs.read(0, 20, np.dtype("float64"))
    _, expected = choose(f.sparsity(), "auto", "declared").evaluate(f, x)
    np.testing.assert_array_equal(group["jacobian"][...], expected)
    nonfinite = jacrun.store.read_attrs(tmp_path / "out.zarr")["nonfinite"]
    assert "y" not in nonfinite and nonfinite["jacobian"] == 0


def test_killed_sparse_job_resumes_with_its_stored_colouring(tmp_path, scheduler_address) -> None:
    job = bratu_job(grid=64, samples=2000, chunks={"samples": 100})
    job["cluster"] = {"kind": "local", "workers": 2, "memory_limit": "1GiB", "dashboard": None}
    config = write_config(tmp_path, job)
    store = tmp_path / "out.zarr"
    partial = kill_part_way(config, store, 3, 20)
    # the colouring in the store wins over a fresh one: permute its colour names
    colours = zarr.open_group(str(store), mode="r+")["colours"]
    stored = colours[...]
    colours[...] = (stored + 1) % 5
    resumed = open_output(prepare(jacrun.load_config(config), calibrate=False))
    np.testing.assert_array_equal(resumed.sparse.colours, (stored + 1) % 5)
    assert resumed.plan.samples_per_block == 100
    again = run_cli("submit", str(config), "--quiet", "--scheduler", scheduler_address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert markers_done(store) == 20 and partial < 20
    f = build_function({"kind": "bratu", "grid": 64})
    x = prepare(jacrun.load_config(config), calibrate=False).inputs.read(0, 2000, np.dtype("float64"))
    values = zarr.open_group(str(store), mode="r")["jacobian"][...]
    sparse = choose(f.sparsity(), "auto", "declared")
    _, expected = sparse.evaluate(f, x)
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)


def test_a_store_with_another_pattern_is_refused(tmp_path, scheduler_address) -> None:
    pattern = build_function({"kind": "bratu", "grid": 4}).sparsity()
    sp.save_npz(tmp_path / "p.npz", sp.csr_matrix(pattern))
    config = write_config(tmp_path, bratu_job(grid=4, samples=20, sparsity={"file": "p.npz"}))
    first = run_cli(
        "submit", str(config), "--quiet", "--set", "inputs.samples=30", "--scheduler", scheduler_address
    )
    assert first.returncode == 0, first.stderr
    zarr.open_group(str(tmp_path / "out.zarr"), mode="r+")["_blocks"][0, 0] = 0  # incomplete
    wider = pattern.tolil()
    wider[0, 15] = True
    sp.save_npz(tmp_path / "p.npz", sp.csr_matrix(wider.tocsr()))
    line = one_error_line(run_cli("submit", str(config), "--set", "inputs.samples=30"))
    assert "another sparsity pattern" in line and "--overwrite" in line


def test_detect_finds_the_pattern_of_a_jax_function(tmp_path) -> None:
    pytest.importorskip("jax")
    pytest.importorskip("asdex")
    module = tmp_path / "jax_stencil.py"
    module.write_text(
        "import jax.numpy as jnp\ndef chain(x):\n    return jnp.concatenate([x[1:] * x[:-1], x[-1:] ** 2])\n"
    )
    spec = {"kind": "python", "target": "jax_stencil:chain", "path": ".", "autodiff": "jax", "n_in": 8}
    config = config_from_dict(bratu_job(function=spec, sparsity="detect"), tmp_path)
    sparse, _ = resolve_sparsity(config, jacrun.prepare.build(config))
    expected = np.eye(8, dtype=bool) | np.eye(8, k=1, dtype=bool)
    np.testing.assert_array_equal(sparse.pattern().toarray(), expected)
    assert sparse.source == "detected" and sparse.n_colours == 2


@pytest.mark.parametrize("shape,direction", [((4000, 40), "fwd"), ((40, 4000), "rev")])
def test_kernel_calls_hold_about_chunk_bytes_of_products_when_m_and_n_differ(shape, direction) -> None:
    """A call's compressed products are (rows, C, m) forward and (rows, C, n) reverse."""
    from jacrun.sparsity import CHUNK_BYTES, dense_pattern

    sparse = SparseJacobian.from_pattern(dense_pattern(*shape), direction)
    assert sparse.product_width == 4000
    rows = sparse.kernel_rows(8)
    assert rows * sparse.n_colours * 4000 * 8 <= CHUNK_BYTES < (rows + 1) * sparse.n_colours * 4000 * 8


def test_helpers_refuse_a_store_without_products(tmp_path, scheduler_address) -> None:
    config = write_config(
        tmp_path,
        bratu_job(grid=4, samples=20, reduce=["mean"], output={"store": "out.zarr", "products": False}),
    )
    assert run_cli("submit", str(config), "--quiet", "--scheduler", scheduler_address).returncode == 0
    with pytest.raises(jacrun.ConfigError, match=r"no per-sample Jacobians \(output.products: false\)"):
        jacrun.jacobian(tmp_path / "out.zarr", 0)
