"""Fused sparse Jacobians of ``autodiff: jax | torch`` targets: one framework computation per
block (all colours' products and the gather), against the general path (the function's
products on the seeds, gathered by NumPy), the framework's own dense Jacobian, the planner's
memory, and a job through the CLI on the session's cluster."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zarr

import jacrun
from jacrun import sparsity
from jacrun.functions import adapters as adapters_pkg
from jacrun.functions import build_function
from jacrun.prepare import prepare
from jacrun.sparsity import SparseJacobian
from jacrun.store import read_attrs
from tests.helpers import REPO, fresh_targets, rel_err, run_cli, write_config  # noqa: F401 - autouse

STENCILS = REPO / "examples" / "stencils"
sys.path.insert(0, str(STENCILS))
import stencil_residuals  # noqa: E402

HERE = __name__
GRID = 5
C = 0.7

needs = {
    name: pytest.mark.skipif(not adapters_pkg.available(name), reason=f"{name} is not installed")
    for name in ("jax", "torch")
}


def allen_cahn_rows_jax(grid: int, c: float = 1.0) -> Callable:
    """The 9-point residual of a batch (B, n) -> (B, n), written for the batch."""
    import jax.numpy as jnp

    def residual(u):
        v = u.reshape(-1, grid, grid)
        edges, corners = stencil_residuals._neighbours(jnp.pad(v, ((0, 0), (1, 1), (1, 1))))
        return ((20 * v - 4 * edges - corners) / 6 + c * (v**3 - v)).reshape(u.shape)

    return residual


def allen_cahn_rows_torch(grid: int, c: float = 1.0) -> Callable:
    import torch

    def residual(u):
        v = u.reshape(-1, grid, grid)
        edges, corners = stencil_residuals._neighbours(torch.nn.functional.pad(v, (1, 1, 1, 1)))
        return ((20 * v - 4 * edges - corners) / 6 + c * (v**3 - v)).reshape(u.shape)

    return residual


def adapter(backend: str, batched: bool, dtype: str = "float64"):
    """The 9-point residual through ``autodiff: backend``, per sample or batched."""
    target = f"{HERE}:allen_cahn_rows_{backend}" if batched else f"stencil_residuals:allen_cahn_{backend}"
    return build_function(
        {
            "kind": "python",
            "autodiff": backend,
            "target": target,
            "path": str(STENCILS),
            "params": {"grid": GRID, "c": C},
            "n_in": GRID * GRID,
            "batched": batched,
            "dtype": dtype,
        }
    )


def dense_jacobians(backend: str, x: np.ndarray) -> np.ndarray:
    """(B, m, n) from the framework itself: ``jax.jacfwd`` or ``torch.func.jacrev``, vmapped."""
    if backend == "jax":
        import jax

        return np.asarray(jax.vmap(jax.jacfwd(stencil_residuals.allen_cahn_jax(GRID, C)))(x))
    import torch
    from torch.func import jacrev, vmap

    return vmap(jacrev(stencil_residuals.allen_cahn_torch(GRID, C)))(torch.from_numpy(x)).numpy()


class GeneralPath:
    """``f`` without its fused path: its products on the seeds, gathered by NumPy in ranges."""

    def __init__(self, f) -> None:
        self.f, self.dtype = f, f.dtype

    def fused_nonzeros(self, x, sparse, out=None, outputs=True) -> None:
        return None

    def sparse_nonzeros(self, x, sparse, out, outputs=True):
        return sparse.gather_products(self.f, x, out)


@pytest.mark.parametrize("batched", [False, True], ids=["per-sample", "batched"])
@pytest.mark.parametrize("direction", ["fwd", "rev"])
@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs[b]) for b in ("jax", "torch")])
def test_fused_nonzeros_equal_the_general_path_and_the_dense_jacobian(
    backend: str, direction: str, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = adapter(backend, batched)
    numpy_f = stencil_residuals.AllenCahn9(GRID, C)
    sparse = SparseJacobian.from_pattern(numpy_f.sparsity(), direction)
    assert sparse.n_colours == 9
    # framework calls of 3 rows (7 rows: 3 + 3 + 1), and of the whole block (3 rows)
    monkeypatch.setattr(sparsity, "CHUNK_BYTES", 3 * 9 * GRID**2 * 8)
    if backend == "jax":
        monkeypatch.setattr(sys.modules[type(f).__module__], "WHOLE_BLOCK_BYTES", 3 * 9 * GRID**2 * 8)
    assert f.fused_rows(sparse, 7) == 3
    x = np.random.default_rng(0).uniform(-1.5, 1.5, (7, f.n_in))
    general_y, general = sparse.evaluate(GeneralPath(f), x)

    def no_ranges(*args: Any) -> None:
        raise AssertionError("the fused path ran the general path")

    monkeypatch.setattr(f, "sparse_nonzeros", no_ranges)
    y, values = sparse.evaluate(f, x)
    assert values.shape == (7, sparse.nnz) and values.dtype == np.float64
    assert rel_err(values, general) <= 1e-15 and rel_err(y, general_y) <= 1e-15
    assert rel_err(y, numpy_f.forward(x)) <= 1e-14
    dense = np.stack([sparse.csr(v).toarray() for v in values])
    assert rel_err(dense, dense_jacobians(backend, x)) <= 1e-15
    assert sparse.evaluate(f, x, outputs=False)[0] is None
    out = np.full_like(values, np.nan)
    assert sparse.evaluate(f, x, out=out)[1] is out and np.array_equal(out, values)
    _, whole = sparse.evaluate(f, x[:3], outputs=False)  # one call for the block
    assert np.array_equal(whole, values[:3])


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs[b]) for b in ("jax", "torch")])
def test_fused_float32_and_a_new_colouring(backend: str) -> None:
    """float32 stays float32; a second colouring (another direction) builds its own kernel."""
    f = adapter(backend, batched=False, dtype="float32")
    pattern = stencil_residuals.stencil9_pattern(GRID)
    x = np.random.default_rng(1).uniform(-1, 1, (3, f.n_in)).astype(np.float32)
    for direction in ("rev", "fwd"):
        sparse = SparseJacobian.from_pattern(pattern, direction)
        _, values = sparse.evaluate(f, x, outputs=False)
        _, expected = sparse.evaluate(stencil_residuals.AllenCahn9(GRID, C, "float32"), x, outputs=False)
        assert values.dtype == np.float32 and rel_err(values, expected) <= 1e-6


@needs["jax"]
def test_the_plan_counts_the_fused_block() -> None:
    """A sparse block of a fused JAX function projects x, the compressed products of the whole
    block and the framework's work on them, not one cache-sized range (torch: its range)."""
    f = adapter("jax", batched=False)
    sparse = SparseJacobian.from_pattern(stencil_residuals.stencil9_pattern(GRID), "rev")
    rows = 100
    products = rows * sparse.n_colours * sparse.product_width * 8
    work = sparse.work_bytes(f, rows)
    assert work == f.fused_work_bytes(sparse, rows)
    assert work >= products + f.work_bytes(rows, sparse.n_colours, "vjp") + rows * f.n_in * 8
    assert sparse.work_bytes(stencil_residuals.AllenCahn9(GRID), rows) < work  # ranges of products
    if adapters_pkg.available("torch"):  # torch runs cache-sized ranges: their products count
        torch_f = adapter("torch", batched=False)
        span = sparse.kernel_rows(8)
        assert torch_f.fused_rows(sparse, 10 * span) == span
        assert sparse.work_bytes(torch_f, 10 * span) < sparse.work_bytes(f, 10 * span)


@needs["jax"]
def test_sparse_job_of_a_jax_target_through_the_cli(tmp_path, scheduler_address: str) -> None:
    """``jacrun submit`` of the JAX 9-point residual (``sparsity: detect``) on the session's
    cluster: the stored nonzeros are the NumPy Function's, and ``--check`` passes."""
    pytest.importorskip("asdex")
    config = write_config(
        tmp_path,
        {
            "name": "fused",
            "mode": "jacobian",
            "function": {
                "kind": "python",
                "autodiff": "jax",
                "target": "stencil_residuals:allen_cahn_jax",
                "path": str(STENCILS),
                "params": {"grid": GRID, "c": C},
            },
            "sparsity": "detect",
            "inputs": {"kind": "random", "samples": 30, "distribution": "uniform", "seed": 1},
            "output": {"store": "out.zarr"},
            "chunks": {"samples": 12},
            "cluster": {"kind": "local", "workers": 1, "dashboard": None},
        },
    )
    done = run_cli("submit", str(config), "--scheduler", scheduler_address, "--check", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    store = tmp_path / "out.zarr"
    attrs = read_attrs(store)
    assert attrs["sparsity"]["source"] == "detected" and attrs["sparsity"]["colours"] == 9
    x = prepare(jacrun.load_config(config), calibrate=False).inputs.read(0, 30, np.dtype("float64"))
    numpy_f = stencil_residuals.AllenCahn9(GRID, C)
    group = zarr.open_group(str(store), mode="r")
    sparse = SparseJacobian.from_pattern(numpy_f.sparsity(), attrs["sparsity"]["mode"], group["colours"][...])
    y, expected = sparse.evaluate(numpy_f, x)
    assert rel_err(group["jacobian"][...], expected) <= 1e-14 and rel_err(group["y"][...], y) <= 1e-14


@needs["torch"]
def test_torch_jvps_on_two_threads_at_once() -> None:
    """torch's forward-mode AD is per process: the adapter's JVPs take turns (the general path
    runs kernels on several threads; without the lock, "no level exists")."""
    from concurrent.futures import ThreadPoolExecutor

    f = adapter("torch", batched=False)
    x = np.random.default_rng(2).uniform(-1, 1, (4, f.n_in))
    t = np.random.default_rng(3).standard_normal((4, 9, f.n_in))
    expected = f.jvp_batch(x, t)[1]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: f.jvp_batch(x, t)[1], range(40)))
    assert all(np.array_equal(r, expected) for r in results)
