"""Reductions over samples: closed forms, determinism across workers, chunkings and resumes, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import jacrun
from jacrun.config import config_from_dict
from jacrun.functions import build_function
from jacrun.prepare import prepare
from tests.helpers import (  # noqa: F401 - fresh_targets: an autouse fixture
    HELD_BLOCKS,
    fresh_targets,
    held_job,
    hold,
    kill_part_way,
    one_error_line,
    run_cli,
    write_config,
)


def job(store: str = "out.zarr", **sections) -> dict:
    """A linear 6 -> 4 vjp with basis cotangents: P_i = A, so every reduction has a closed form."""
    config = {
        "name": "reduce",
        "mode": "vjp",
        "function": {"kind": "linear", "n_in": 6, "n_out": 4, "seed": 3},
        "inputs": {"kind": "random", "samples": 300, "seed": 1},
        "vectors": {"kind": "basis"},
        "reduce": ["mean", "gram", "norms"],
        "output": {"store": store},
        "chunks": {"samples": 64},
        "cluster": {"kind": "local", "workers": 1, "memory_limit": "1GiB", "dashboard": None},
    }
    config.update(sections)
    return config


@pytest.fixture
def run(tmp_path, scheduler_address):
    """``run(config)``: submit the job on the session's cluster (``own_cluster=True``: on the
    config's own local cluster) and load its store."""

    def submit_and_load(config: dict, own_cluster: bool = False, **options) -> object:
        cfg = config_from_dict(config, tmp_path)
        scheduler = None if own_cluster else scheduler_address
        summary = jacrun.submit(cfg, progress=False, scheduler=scheduler, **options)
        assert summary.ok, summary.failures
        return jacrun.load(cfg.output.store)

    return submit_and_load


def matrix(spec: dict) -> np.ndarray:
    return build_function(spec).matrix


def inputs(tmp_path, config: dict) -> np.ndarray:
    job_ = prepare(config_from_dict(config, tmp_path), calibrate=False)
    return job_.inputs.read(0, job_.plan.samples, np.dtype("float64"))


# ---- closed forms ----------------------------------------------------------------------------


def test_linear_with_basis_vectors_gives_a_transpose_a(tmp_path, run) -> None:
    config = job()
    ds = run(config)
    a = matrix(config["function"])
    np.testing.assert_allclose(ds.gram.values, a.T @ a, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ds["mean"].values, a, rtol=1e-13)
    np.testing.assert_allclose(ds.norms.values, np.tile(np.linalg.norm(a, axis=1), (300, 1)), rtol=1e-13)
    assert ds.gram.dims == ("input", "input2") and ds["mean"].dims == ("vector", "input")
    values, vectors = np.linalg.eigh(a.T @ a)
    np.testing.assert_allclose(ds.gram_eigenvalues.values, values[::-1], rtol=1e-10, atol=1e-13)
    assert ds.gram_eigenvectors.dims == ("input", "eigen")
    overlap = np.abs(np.sum(ds.gram_eigenvectors.values[:, :4] * vectors[:, ::-1][:, :4], axis=0))
    np.testing.assert_allclose(overlap, 1, rtol=1e-8)
    assert "vjp" in ds  # products stored too (output.products defaults to true)
    attrs = ds.attrs["jacrun"]["reductions"]
    assert attrs["names"] == ["mean", "gram", "norms"] and len(attrs["eigenvalues"]) == 6


def test_random_probes_estimate_a_transpose_a_and_their_mean_vanishes(tmp_path, run) -> None:
    samples, k = 4000, 4
    config = job(
        vectors={"kind": "random", "distribution": "rademacher", "count": k, "seed": 5},
        inputs={"kind": "random", "samples": samples, "seed": 1},
        chunks={"samples": 1000},
        output={"store": "out.zarr", "products": False},
    )
    ds = run(config)
    a = matrix(config["function"])
    exact = a.T @ a
    # Rademacher probes: each entry's estimator has variance <= (sum |a|)^2 / (N K) per entry
    scale = np.abs(a).sum() ** 2 / np.sqrt(samples * k)
    assert np.max(np.abs(ds.gram.values - exact)) < 4 * scale
    assert np.max(np.abs(ds.gram.values - exact)) > 0  # an estimate, not the exact value
    # (1/N) sum_i v_i^T A: each entry a mean of N independent +-a_rj sums, sd |a_j| / sqrt(N)
    sd = np.linalg.norm(a, axis=0) / np.sqrt(samples)
    assert np.all(np.abs(ds["mean"].values) < 5 * sd)
    assert "vjp" not in ds and ds.norms.shape == (samples, k)


def test_ridge_function_has_a_rank_one_gram_along_its_direction(tmp_path, run) -> None:
    """f(x) = w tanh(a^T x + b) + c: grad f = w (1 - tanh^2) a, so E[grad grad^T] = s a a^T."""
    spec = {"kind": "mlp", "sizes": [8, 1, 1], "seed": 4}
    config = job(
        function=spec,
        vectors={"kind": "ones"},
        reduce=["gram"],
        output={"store": "r.zarr", "products": False},
    )
    ds = run(config)
    weights = build_function(spec).weights[0][0]
    direction = weights / np.linalg.norm(weights)
    values = ds.gram_eigenvalues.values
    assert values[0] > 0 and np.all(np.abs(values[1:]) < 1e-12 * values[0])
    np.testing.assert_allclose(np.abs(ds.gram_eigenvectors.values[:, 0] @ direction), 1, rtol=1e-10)


def test_jvp_gram_is_m_by_m(tmp_path, run) -> None:
    config = job(mode="jvp", reduce=["gram", "mean"])
    ds = run(config)
    a = matrix(config["function"])
    np.testing.assert_allclose(ds.gram.values, a @ a.T, rtol=1e-13, atol=1e-15)
    assert ds.gram.dims == ("output", "output2") and ds["mean"].shape == (6, 4)


@pytest.mark.parametrize("sparsity", ["dense", "auto"])
@pytest.mark.parametrize("strategy", ["rev", "fwd"])
def test_jacobian_reductions_dense_and_sparse(tmp_path, sparsity: str, strategy: str, run) -> None:
    spec = {"kind": "bratu", "grid": 4}
    config = job(
        mode="jacobian",
        function=spec,
        vectors=None,
        sparsity=sparsity,
        strategy=strategy,
        inputs={"kind": "random", "samples": 100, "seed": 1, "distribution": "uniform"},
        chunks={"samples": 32},
    )
    del config["vectors"]
    ds = run(config)
    _, jac = build_function(spec).jacobian(inputs(tmp_path, config))
    np.testing.assert_allclose(ds.gram.values, np.einsum("bmi,bmj->ij", jac, jac) / 100, rtol=1e-12)
    np.testing.assert_allclose(ds.norms.values, np.linalg.norm(jac, axis=(1, 2)), rtol=1e-12)
    mean = ds["mean"].values
    if sparsity == "auto":  # the mean of the nonzeros, in CSR order
        mean = (
            jacrun.jacobian(tmp_path / "out.zarr", 0)
            .__class__((mean, ds.indices.values, ds.indptr.values), shape=(16, 16))
            .toarray()
        )
    np.testing.assert_allclose(mean, jac.mean(axis=0), rtol=1e-12, atol=1e-14)


# ---- determinism ---------------------------------------------------------------------------------


def gram_job(store: str, **sections) -> dict:
    defaults = {
        "function": {"kind": "mlp", "sizes": [16, 32, 1], "seed": 0, "dtype": "float32"},
        "vectors": {"kind": "ones"},
        "reduce": ["gram", "mean"],
        "inputs": {"kind": "random", "samples": 6000, "seed": 1},
        "chunks": {"samples": 500},
        "output": {"store": store, "products": False},
    }
    return job(store, **{**defaults, **sections})


def test_gram_is_bit_identical_across_worker_counts_and_close_across_chunkings(tmp_path, run) -> None:
    one = run(gram_job("one.zarr"), own_cluster=True)  # the job's 1-worker cluster
    two = run(gram_job("two.zarr"))  # the session's 2 workers
    np.testing.assert_array_equal(one.gram.values, two.gram.values)
    np.testing.assert_array_equal(one["mean"].values, two["mean"].values)
    other = run(gram_job("other.zarr", chunks={"samples": 700}))
    # float32 products of a 500-row and a 700-row block may round differently (BLAS kernels
    # differ by CPU and block shape): the Grams agree to float32 rounding, norm-wise
    error = np.abs(other.gram.values - one.gram.values).max() / np.abs(one.gram.values).max()
    assert error <= 64 * np.finfo(np.float32).eps, error
    assert not any(
        name.startswith("_partial") for name in zarr.open_group(str(tmp_path / "one.zarr")).array_keys()
    )


def test_killed_reduction_resumes_to_the_same_bits(tmp_path, scheduler_address) -> None:
    reductions = {"reduce": ["gram", "mean"], "output": {"store": "killed.zarr", "products": False}}
    raw = held_job(tmp_path, **reductions)
    reference = config_from_dict({**raw, "output": {**raw["output"], "store": "reference.zarr"}}, tmp_path)
    assert jacrun.submit(reference, scheduler=scheduler_address, progress=False).ok  # not held: no hold file
    config = write_config(tmp_path, raw)
    store = tmp_path / "killed.zarr"
    released = hold(tmp_path)
    partial = kill_part_way(config, store, 3, HELD_BLOCKS)
    released.unlink()
    again = run_cli("submit", str(config), "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    runs = jacrun.load(store).attrs["jacrun"]["runs"]
    assert runs[-1]["blocks_computed"] == HELD_BLOCKS - partial  # finished blocks were not recomputed
    resumed, clean = jacrun.load(store), jacrun.load(tmp_path / "reference.zarr")
    np.testing.assert_array_equal(resumed.gram.values, clean.gram.values)
    np.testing.assert_array_equal(resumed["mean"].values, clean["mean"].values)


# ---- policies, checks, commands --------------------------------------------------------------


def test_nonfinite_products_follow_the_policy_and_are_counted(tmp_path, run, scheduler_address) -> None:
    x = np.random.default_rng(0).standard_normal((50, 6))
    x[7, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    base = job(
        function={"kind": "mlp", "sizes": [6, 8, 4], "seed": 0},
        inputs={"kind": "npy", "path": "x.npy"},
        chunks={"samples": 25},
        output={"store": "p.zarr", "products": False},
    )
    ds = run({**base, "nan_policy": "propagate"})
    assert np.isnan(ds.gram.values).any() and ds.attrs["jacrun"]["nonfinite"]["vjp"] > 0
    assert np.isnan(ds.norms.values[7]).all() and np.isfinite(ds.norms.values[8]).all()
    cfg = config_from_dict({**base, "output": {"store": "r.zarr", "products": False}}, tmp_path)
    summary = jacrun.submit(cfg, progress=False, scheduler=scheduler_address)
    assert not summary.ok and "sample 7" in summary.failures[0]


def test_cli_submit_check_show_and_plot(tmp_path, scheduler_address) -> None:
    config = write_config(tmp_path, job(output={"store": "out.zarr", "products": False}))
    done = run_cli("submit", str(config), "--check", "--scheduler", scheduler_address)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = run_cli("show", str(tmp_path / "out.zarr"))
    assert "gram eigenvalues" in shown.stdout and "largest gap" in shown.stdout
    picture = run_cli("plot", str(tmp_path / "out.zarr"))
    assert picture.returncode == 0, picture.stderr
    assert picture.stdout.strip() == f"wrote {tmp_path / 'out.png'}"
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = run_cli("plot", str(tmp_path / "out.zarr"), "--output", str(tmp_path / "g.png"))
    assert chosen.returncode == 0 and (tmp_path / "g.png").exists()
    opened = __import__("xarray").open_zarr(tmp_path / "out.zarr")  # consolidated metadata is current
    assert "gram_eigenvalues" in opened and "_partial_gram" not in opened


def test_plot_names_its_png_after_the_store() -> None:
    from jacrun.plot import default_output

    assert default_output("results/job.zarr") == Path("results/job.png")
    assert default_output(Path("results/job")) == Path("results/job.png")
    assert default_output("s3://bucket/runs/job.zarr/") == Path("job.png")  # here, not in the bucket


def test_plot_without_matplotlib_says_which_extra(tmp_path, scheduler_address) -> None:
    config = write_config(tmp_path, job())
    assert run_cli("submit", str(config), "--quiet", "--scheduler", scheduler_address).returncode == 0
    code = "import sys; sys.modules['matplotlib'] = None; from jacrun.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "plot", str(tmp_path / "out.zarr")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "pip install 'jacrun[plot]'" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_bad_reduction_configs_are_one_line_exit_2(tmp_path) -> None:
    cases = {
        "unknown": (job(reduce=["mean", "median"]), "reduce.1: unknown reduction 'median'"),
        "twice": (job(reduce=["gram", "gram"]), "reduce: lists a reduction twice"),
        "nothing": (
            job(reduce=[], output={"store": "out.zarr", "products": False}),
            "output.products: false",
        ),
        "too large": (
            job(function={"kind": "linear", "n_in": 20000, "n_out": 2, "seed": 0}),
            "reduce: gram of 20000-wide products is a 20000 x 20000 float64 matrix (3.0 GiB)",
        ),
    }
    for name, (config, message) in cases.items():
        line = one_error_line(run_cli("validate", str(write_config(tmp_path, config, f"{name}.yaml"))))
        assert message in line and f"{name}.yaml" in line, (name, line)
        assert "norms" in line or name != "too large"
    assert not (tmp_path / "out.zarr").exists()


def test_reductions_of_an_autodiff_function_on_a_scheduler_address(tmp_path, scheduler_address, run) -> None:
    """kind: python with autodiff: jax, run on an existing cluster (cluster kind: address)."""
    pytest.importorskip("jax")
    (tmp_path / "jax_quadratic.py").write_text(
        "import jax.numpy as jnp\n"
        "def energy(x):\n"
        "    return jnp.sum(x * jnp.arange(1.0, x.shape[0] + 1) * x)\n"
    )
    spec = {"kind": "python", "target": "jax_quadratic:energy", "path": ".", "autodiff": "jax", "n_in": 3}
    config = job(function=spec, vectors={"kind": "ones"}, reduce=["gram", "mean"])
    ds = run(config)
    x = inputs(tmp_path, config)
    grads = 2 * x * np.arange(1.0, 4.0)  # grad of sum_j j x_j^2
    np.testing.assert_allclose(ds.gram.values, grads.T @ grads / len(x), rtol=1e-12)
    np.testing.assert_allclose(ds["mean"].values, grads.mean(axis=0), rtol=1e-12, atol=1e-15)


def test_vector_blocks_split_the_products_of_a_sample(tmp_path, run) -> None:
    """chunks.vectors < K: each block holds some of a sample's products; the results agree."""
    probes = {"kind": "random", "count": 5, "seed": 5}
    whole = run(job("whole.zarr", vectors=probes, function={"kind": "mlp", "sizes": [6, 9, 4]}))
    split = run(
        job(
            "split.zarr",
            vectors=probes,
            function={"kind": "mlp", "sizes": [6, 9, 4]},
            chunks={"samples": 64, "vectors": 2},
        ),
    )
    assert split.attrs["jacrun"]["plan"]["grid"] == [5, 3]
    np.testing.assert_array_equal(split["mean"].values, whole["mean"].values)
    np.testing.assert_array_equal(split.norms.values, whole.norms.values)
    np.testing.assert_allclose(split.gram.values, whole.gram.values, rtol=1e-13)


def test_repair_refuses_a_store_whose_reductions_were_combined(tmp_path, scheduler_address) -> None:
    from jacrun.verify import repair

    config = config_from_dict(job(), tmp_path)
    assert jacrun.submit(config, progress=False, scheduler=scheduler_address).ok
    with pytest.raises(jacrun.ConfigError, match="rerun the job with --overwrite"):
        repair(config.output.store, [(0, 0)])
