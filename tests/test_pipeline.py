"""End to end on a real Dask cluster and real Zarr stores: each mode against an independent reference."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import jacrun
from jacrun.config import config_from_dict
from jacrun.errors import ConfigError
from jacrun.store import IncompleteWarning
from tests.helpers import job_config, rel_err

N, n, m = 90, 5, 3


@pytest.fixture
def data(tmp_path):
    """Integer-valued A, b, X and +-1 vectors: every product below is exact in float64."""
    rng = np.random.default_rng(0)
    arrays = {
        "A": rng.integers(-4, 5, (m, n)).astype(float),
        "b": rng.integers(-4, 5, (m,)).astype(float),
        "X": rng.integers(-9, 10, (N, n)).astype(float),
        "V": rng.choice([-1.0, 1.0], (N, 4, m)),
        "V1": rng.choice([-1.0, 1.0], (N, m)),
        "T": rng.choice([-1.0, 1.0], (2, n)),
    }
    for name, value in arrays.items():
        np.save(tmp_path / f"{name}.npy", value)
    return arrays


def linear_job(tmp_path, **sections):
    sections.setdefault("function", {"kind": "linear", "matrix": "A.npy", "bias": "b.npy"})
    sections.setdefault("inputs", {"kind": "npy", "path": "X.npy"})
    return config_from_dict(job_config(**sections), tmp_path)


def run(cfg, scheduler_address, **options):
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False, **options)
    assert summary.ok, summary.failures
    return jacrun.load(cfg.output.store)


def test_linear_vjp_per_sample_vectors_is_exact(tmp_path, data, scheduler_address):
    cfg = linear_job(tmp_path, vectors={"kind": "npy", "path": "V.npy"}, chunks={"samples": 16, "vectors": 3})
    ds = run(cfg, scheduler_address)
    assert ds.vjp.dims == ("sample", "vector", "input") and ds.vjp.shape == (N, 4, n)
    np.testing.assert_array_equal(ds.vjp.values, data["V"] @ data["A"])
    np.testing.assert_array_equal(ds.y.values, data["X"] @ data["A"].T + data["b"])
    attrs = ds.attrs["jacrun"]
    assert attrs["status"] == "complete" and attrs["blocks_done"] == attrs["blocks_total"] == 6 * 2
    assert attrs["function"] == {"kind": "linear", "n_in": n, "n_out": m, "dtype": "float64"}
    assert attrs["config_hash"] == cfg.content_hash() and attrs["runs"][0]["blocks_computed"] == 12


def test_linear_vjp_single_vector_has_the_shape_of_x(tmp_path, data, scheduler_address):
    ds = run(linear_job(tmp_path, vectors={"kind": "npy", "path": "V1.npy"}), scheduler_address)
    assert ds.vjp.dims == ("sample", "input")
    np.testing.assert_array_equal(ds.vjp.values, data["V1"] @ data["A"])


def test_linear_jvp_shared_vectors_is_exact(tmp_path, data, scheduler_address):
    cfg = linear_job(
        tmp_path, mode="jvp", vectors={"kind": "npy", "path": "T.npy", "shared": True}, chunks={"samples": 40}
    )
    ds = run(cfg, scheduler_address)
    assert ds.jvp.dims == ("sample", "vector", "output")
    expected = np.broadcast_to(data["T"] @ data["A"].T, (N, 2, m))
    np.testing.assert_array_equal(ds.jvp.values, expected)


@pytest.mark.parametrize("strategy", ["rev", "fwd"])
def test_linear_jacobian_is_the_matrix(tmp_path, data, scheduler_address, strategy):
    cfg = linear_job(
        tmp_path, mode="jacobian", vectors=None, strategy=strategy, chunks={"samples": 25, "vectors": 2}
    )
    ds = run(cfg, scheduler_address)
    assert ds.jacobian.dims == ("sample", "output", "input")
    np.testing.assert_array_equal(ds.jacobian.values, np.broadcast_to(data["A"], (N, m, n)))
    assert ds.attrs["jacrun"]["plan"]["strategy"] == strategy


def test_ones_and_basis_vectors(tmp_path, data, scheduler_address):
    ds = run(linear_job(tmp_path, vectors={"kind": "ones"}), scheduler_address)
    np.testing.assert_array_equal(ds.vjp.values, np.broadcast_to(data["A"].sum(0), (N, n)))
    cfg = linear_job(tmp_path, vectors={"kind": "basis"}, output={"store": "basis.zarr"})
    ds = run(cfg, scheduler_address)
    np.testing.assert_array_equal(ds.vjp.values, np.broadcast_to(data["A"], (N, m, n)))


MLP = {"kind": "mlp", "sizes": [6, 16, 16, 4], "activation": "tanh", "seed": 3}


def mlp_job(tmp_path, **sections):
    sections.setdefault("function", MLP)
    sections.setdefault("inputs", {"kind": "random", "samples": 60, "seed": 4})
    return config_from_dict(job_config(**sections), tmp_path)


def test_mlp_vjp_matches_central_finite_differences(tmp_path, scheduler_address):
    cfg = mlp_job(tmp_path, vectors={"kind": "random", "count": 2, "distribution": "normal"})
    ds = run(cfg, scheduler_address)
    f = jacrun.build_function(MLP)
    job = __import__("jacrun.prepare", fromlist=["prepare"]).prepare(cfg)
    x = job.inputs.read(0, 60, f.dtype)
    v = job.vectors.read(0, 60, 0, 2, f.dtype)
    h = 1e-5
    jac = np.empty((60, 4, 6))
    for i in range(6):
        step = np.zeros(6)
        step[i] = h
        jac[:, :, i] = (f.forward(x + step) - f.forward(x - step)) / (2 * h)
    expected = np.einsum("bkm,bmn->bkn", v, jac)
    assert rel_err(ds.vjp.values, expected) < 1e-7
    np.testing.assert_allclose(ds.y.values, f.forward(x), rtol=1e-14)


def test_mlp_jacobian_rev_equals_fwd(tmp_path, scheduler_address):
    rev = run(
        mlp_job(tmp_path, mode="jacobian", vectors=None, strategy="rev", output={"store": "rev.zarr"}),
        scheduler_address,
    )
    fwd = run(
        mlp_job(
            tmp_path,
            mode="jacobian",
            vectors=None,
            strategy="fwd",
            output={"store": "fwd.zarr"},
            chunks={"samples": 25, "vectors": 4},
        ),
        scheduler_address,
    )
    assert rel_err(rev.jacobian.values, fwd.jacobian.values) < 1e-12
    basis_vjp = run(
        mlp_job(tmp_path, vectors={"kind": "basis"}, output={"store": "bv.zarr"}), scheduler_address
    )
    basis_jvp = run(
        mlp_job(tmp_path, mode="jvp", vectors={"kind": "basis"}, output={"store": "bj.zarr"}),
        scheduler_address,
    )
    # vjp of the output basis is J; jvp of the input basis is J^T
    assert rel_err(basis_vjp.vjp.values, basis_jvp.jvp.values.transpose(0, 2, 1)) < 1e-12


def test_two_chunkings_agree(tmp_path, scheduler_address):
    vectors = {"kind": "random", "count": 5, "distribution": "normal", "seed": 8}
    a = run(
        mlp_job(tmp_path, vectors=vectors, chunks={"samples": 7, "vectors": 2}, output={"store": "a.zarr"}),
        scheduler_address,
    )
    b = run(
        mlp_job(tmp_path, vectors=vectors, chunks={"samples": 60, "vectors": 5}, output={"store": "b.zarr"}),
        scheduler_address,
    )
    assert rel_err(a.vjp.values, b.vjp.values) < 1e-12
    assert rel_err(a.y.values, b.y.values) < 1e-12


def test_results_identical_for_one_and_two_workers(tmp_path, scheduler_address):
    stores = []
    for workers, scheduler in ((1, None), (2, scheduler_address)):  # a 1-worker cluster; the session's 2
        cfg = mlp_job(
            tmp_path,
            vectors={"kind": "random", "count": 3},
            output={"store": f"w{workers}.zarr"},
            cluster={"kind": "local", "workers": 1, "memory_limit": "1GiB", "dashboard": None},
        )
        assert jacrun.submit(cfg, progress=False, scheduler=scheduler).ok
        stores.append(jacrun.load(cfg.output.store))
    np.testing.assert_array_equal(stores[0].vjp.values, stores[1].vjp.values)
    np.testing.assert_array_equal(stores[0].y.values, stores[1].y.values)


def test_output_dtype_compression_and_plain_xarray(tmp_path, scheduler_address):
    cfg = mlp_job(
        tmp_path,
        vectors={"kind": "random", "count": 2},
        output={"store": "f32.zarr", "dtype": "float32", "compression": "blosc", "save_outputs": False},
    )
    run(cfg, scheduler_address)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata: no fallback warning
        ds = xr.open_zarr(cfg.output.store)
    assert ds.vjp.dtype == np.float32 and "y" not in ds
    assert ds.vjp.chunks is not None  # lazy, dask-backed
    assert json.dumps(ds.attrs["jacrun"]["config"])  # resolved config stored as JSON


def test_every_compression_stores_the_same_values_with_its_codec(tmp_path, scheduler_address):
    """zstd (level 1), blosc (lz4 over bit-shuffled values) and none: lossless, each recorded in
    the arrays' metadata so any Zarr v3 reader decodes them; a CRC32C checksum comes last."""
    expected_codecs = {
        "zstd": [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}],
        "blosc": [
            {
                "name": "blosc",
                "configuration": {
                    "typesize": 4,
                    "cname": "lz4",
                    "clevel": 5,
                    "shuffle": "bitshuffle",
                    "blocksize": 0,
                },
            }
        ],
        "none": [],
    }
    values = {}
    for compression, codecs in expected_codecs.items():
        output = {"store": f"{compression}.zarr", "dtype": "float32", "compression": compression}
        cfg = mlp_job(tmp_path, vectors={"kind": "random", "count": 2}, output=output)
        values[compression] = run(cfg, scheduler_address).vjp.values
        for name in ("vjp", "y"):
            meta = json.loads((tmp_path / f"{compression}.zarr" / name / "zarr.json").read_text())
            assert meta["codecs"][1:] == [*codecs, {"name": "crc32c"}], (compression, name)
    np.testing.assert_array_equal(values["zstd"], values["none"])
    np.testing.assert_array_equal(values["blosc"], values["none"])
    assert np.isfinite(values["none"]).all()


def test_rerun_computes_only_missing_blocks(tmp_path, scheduler_address):
    cfg = mlp_job(tmp_path, vectors={"kind": "random", "count": 2}, chunks={"samples": 10})
    full = run(cfg, scheduler_address).vjp.values
    group = zarr.open_group(str(cfg.output.store), mode="r+")
    group["_blocks"][2:4, 0] = 0
    group["vjp"][20:40] = 0.0  # simulate half-written chunks of unmarked blocks
    with pytest.warns(IncompleteWarning):
        jacrun.load(cfg.output.store)
    again = run(cfg, scheduler_address)
    np.testing.assert_array_equal(again.vjp.values, full)
    runs = again.attrs["jacrun"]["runs"]
    assert [r["blocks_computed"] for r in runs] == [6, 2]
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert summary.ok and summary.blocks_run == 0


def test_another_config_is_refused_then_overwritten(tmp_path, scheduler_address):
    cfg = mlp_job(tmp_path, vectors={"kind": "random", "count": 2})
    run(cfg, scheduler_address)
    other = mlp_job(tmp_path, vectors={"kind": "random", "count": 2, "seed": 99})
    with pytest.raises(ConfigError, match="holds another job"):
        jacrun.submit(other, scheduler=scheduler_address, progress=False)
    ds = run(other, scheduler_address, overwrite=True)
    assert ds.attrs["jacrun"]["config_hash"] == other.content_hash()


def test_resume_with_different_explicit_chunks_is_refused(tmp_path, scheduler_address):
    cfg = mlp_job(tmp_path, vectors={"kind": "random", "count": 2}, chunks={"samples": 10})
    run(cfg, scheduler_address)
    with pytest.raises(ConfigError, match="chunks.samples: 20 does not match the existing store's chunking"):
        jacrun.submit(
            mlp_job(tmp_path, vectors={"kind": "random", "count": 2}, chunks={"samples": 20}),
            scheduler=scheduler_address,
            progress=False,
        )
    auto = mlp_job(tmp_path, vectors={"kind": "random", "count": 2}, chunks={"samples": "auto"})
    assert jacrun.submit(auto, scheduler=scheduler_address, progress=False).ok


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_folder_is_never_touched(tmp_path, scheduler_address, overwrite):
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    cfg = mlp_job(tmp_path, vectors={"kind": "random", "count": 2})
    with pytest.raises(ConfigError, match="not a jacrun store"):
        jacrun.submit(cfg, scheduler=scheduler_address, progress=False, overwrite=overwrite)
    assert (folder / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in folder.iterdir()) == ["precious.txt"]


def test_nan_policy(tmp_path, data, scheduler_address):
    x = data["X"].copy()
    x[47, 2] = np.nan
    np.save(tmp_path / "Xnan.npy", x)
    cfg = linear_job(
        tmp_path, inputs={"kind": "npy", "path": "Xnan.npy"}, vectors={"kind": "ones"}, retries=0
    )
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert summary.status == "failed" and len(summary.failures) == 1
    assert "samples 32:64" in summary.failures[0] and "sample 47" in summary.failures[0]
    assert summary.blocks_done == summary.blocks_total - 1
    cfg = linear_job(
        tmp_path,
        inputs={"kind": "npy", "path": "Xnan.npy"},
        vectors={"kind": "ones"},
        nan_policy="propagate",
        output={"store": "p.zarr"},
    )
    ds = run(cfg, scheduler_address)
    assert ds.attrs["jacrun"]["nonfinite"] == {"x": 1, "y": m, "vjp": 0}


def test_every_block_times_its_steps(tmp_path, scheduler_address):
    """Each block reports seconds per step; the run sums them into the store and the summary."""
    from jacrun.block import STEPS, step_shares

    cfg = config_from_dict(job_config(str(tmp_path / "t.zarr")))
    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert summary.ok and set(summary.block_seconds) == set(STEPS)
    assert summary.block_seconds["kernel"] > 0 and summary.block_seconds["write"] > 0
    stored = jacrun.load(tmp_path / "t.zarr").attrs["jacrun"]["throughput"]["block_seconds"]
    assert stored == summary.block_seconds
    assert step_shares({"kernel": 3.0, "write": 1.0, "setup": 0.001}) == "kernel 75%, write 25%"
    assert step_shares(dict.fromkeys(STEPS, 0.0)) == ""


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.ones((64, 3), np.float32), 0),
        (np.full((64, 3), 3e38, np.float32), 0),  # the sum overflows: counted, none found
        (np.array([1.0, np.nan, 2.0]), 1),
        (np.array([np.inf, -np.inf, 1.0, np.nan]), 3),  # inf - inf: a NaN sum
        (np.zeros((0, 4)), 0),
    ],
)
def test_nonfinite_count(values, expected):
    from jacrun.block import nonfinite_count

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow/invalid warnings reach the worker's log
        assert nonfinite_count(values) == expected


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"inputs": {"kind": "npy", "path": "V.npy"}}, "inputs.path: .* has shape \\(90, 4, 3\\)"),
        (
            {"vectors": {"kind": "npy", "path": "X.npy"}},
            "vectors.path: .* last axis must be the vector width 3",
        ),
        ({"function": {"kind": "linear", "matrix": "V.npy"}}, "function\\.matrix: .*matrix"),
    ],
)
def test_shape_mismatches_fail_before_any_store(tmp_path, data, sections, message):
    cfg = linear_job(tmp_path, **sections)
    with pytest.raises(ConfigError, match=message):
        jacrun.submit(cfg, progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_an_output_path_that_cannot_be_created_is_a_config_error(tmp_path, data):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = linear_job(tmp_path, vectors={"kind": "ones"}, output={"store": "a-file/out.zarr"})
    with pytest.raises(ConfigError, match="output.store: cannot create .*a-file/out.zarr"):
        jacrun.submit(cfg, progress=False)
    assert (tmp_path / "a-file").read_text() == "not a folder"
