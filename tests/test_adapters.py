"""``kind: python`` with ``autodiff: torch | jax | autograd``: plain functions differentiated by a framework.

The central test runs one MLP four ways through ``jacrun.submit`` on a real cluster: the
built-in ``mlp`` (weights .npz in torch Linear layout), a PyTorch ``nn.Module`` (a state dict),
a JAX function and an autograd function (the examples' factories, given the same .npz), and
requires the same VJPs, JVPs and Jacobians to 1e-10. The rest are in process: the adapter's
kernels against the built-in, gradient checks, and each refusal with its message.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

import jacrun
from jacrun.checks import check_spec
from jacrun.config import config_from_dict
from jacrun.errors import ConfigError
from jacrun.functions import Function, build_function, parse_spec
from jacrun.functions import adapters as adapters_pkg
from jacrun.functions.python import TargetError
from tests.helpers import REPO, fresh_targets, job_config, rel_err  # noqa: F401 - an autouse fixture

HERE = __name__
EXAMPLES = REPO / "examples"
SIZES = [6, 16, 16, 4]
N = 60
BACKENDS = ("torch", "jax", "autograd")

needs = {
    name: pytest.mark.skipif(not adapters_pkg.available(name), reason=f"{name} is not installed")
    for name in BACKENDS
}


# ---- targets defined here (frameworks imported on call, so this module imports without them) ---


def torch_f(x: Any) -> Any:
    """One sample (3,) -> (2,)."""
    import torch

    return torch.stack([torch.sin(x[0] * x[1]), x[2] ** 2 + torch.exp(0.3 * x[0])])


def torch_energy(x: Any) -> Any:
    """A scalar per sample: m = 1."""
    import torch

    return (x**2).sum() + torch.sin(x).prod()


def jax_f(x: Any) -> Any:
    import jax.numpy as jnp

    return jnp.stack([jnp.sin(x[0] * x[1]), x[2] ** 2 + jnp.exp(0.3 * x[0])])


def jax_f_batched(x: Any) -> Any:
    import jax.numpy as jnp

    return jnp.stack([jnp.sin(x[:, 0] * x[:, 1]), x[:, 2] ** 2 + jnp.exp(0.3 * x[:, 0])], axis=1)


def autograd_f(x: Any) -> Any:
    import autograd.numpy as anp

    return anp.stack([anp.sin(x[:, 0] * x[:, 1]), x[:, 2] ** 2 + anp.exp(0.3 * x[:, 0])], axis=1)


def autograd_centered(x: Any) -> Any:
    """Couples samples: subtracts the batch mean."""
    return x - x.mean(axis=0)


def jax_matrix(x: Any) -> Any:
    """A matrix per sample: refused."""
    import jax.numpy as jnp

    return jnp.outer(x, x)


def jax_branchy(x: Any) -> Any:
    """Python control flow on a traced value: JAX cannot differentiate it under vmap."""
    return x * 2 if x[0] > 0 else x


def autograd_float64(x: Any) -> Any:
    return x * np.ones(x.shape[1])  # float64 constant: promotes float32 inputs


def make_scaled(c: float = 2.0, dtype: Any = "float64") -> Callable[[Any], Any]:
    """A factory (annotated to return a callable): f(x) = c * sin(x), batched, autograd."""
    import autograd.numpy as anp

    scale = np.asarray(c, dtype=dtype)

    def f(x: Any) -> Any:
        return scale * anp.sin(x)

    f.n_in = 3  # type: ignore[attr-defined]
    return f


def make_nothing() -> Callable:
    return 42  # type: ignore[return-value]


def needs_params(c: float) -> Any:
    """A plain function (no callable return annotation): never called with params."""
    raise AssertionError("a plain function must not be called with params")


class Hand(Function):
    """A jacrun Function: has its own kernels, so autodiff is refused."""

    def __init__(self) -> None:
        self.n_in = self.n_out = 1
        self.dtype = np.dtype("float64")

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        return x

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x, v

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x, t


CONSTANT = 3


def section(backend: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "python", "autodiff": backend, "target": target, **extra}


# ---- one MLP, four ways ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """W.npz (W0, b0, ...: torch Linear layout) and state.pt (the same, as the module's state dict)."""
    folder = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(7)
    arrays = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        arrays[f"W{i}"] = rng.standard_normal((b, a)) / np.sqrt(a)
        arrays[f"b{i}"] = 0.1 * rng.standard_normal(b)
    np.savez(folder / "W.npz", **arrays)
    if adapters_pkg.available("torch"):
        import torch

        state = {}
        for i in range(len(SIZES) - 1):
            state[f"layers.{i}.weight"] = torch.from_numpy(arrays[f"W{i}"])
            state[f"layers.{i}.bias"] = torch.from_numpy(arrays[f"b{i}"])
        torch.save(state, folder / "state.pt")
        np.savez(folder / "state.npz", **{key: value.numpy() for key, value in state.items()})
    return folder


def mlp_sections(files: Path) -> dict[str, dict[str, Any]]:
    """The same MLP as the built-in and as each adapter (given the same weights)."""
    return {
        "mlp": {"kind": "mlp", "sizes": SIZES, "activation": "tanh", "weights": str(files / "W.npz")},
        "torch": section(
            "torch",
            "torch_mlp:MLP",
            path=str(EXAMPLES / "torch_mlp"),
            params={"sizes": SIZES, "activation": "tanh"},
            weights=str(files / "state.pt"),  # MLP has no `weights` parameter: a state dict
        ),
        "jax": section(
            "jax",
            "jax_mlp:mlp",
            path=str(EXAMPLES / "jax_fn"),
            n_in=SIZES[0],
            weights=str(files / "W.npz"),  # passed to the factory's `weights` parameter
        ),
        "autograd": section(
            "autograd",
            "autograd_mlp:mlp",
            path=str(EXAMPLES / "autograd_fn"),
            batched=True,
            n_in=SIZES[0],
            n_out=SIZES[-1],
            weights=str(files / "W.npz"),
        ),
    }


JOBS = {
    "vjp per-sample cotangents": {"mode": "vjp", "vectors": {"kind": "random", "count": 3, "seed": 2}},
    "jvp shared tangents": {
        "mode": "jvp",
        "vectors": {"kind": "random", "count": 2, "shared": True, "seed": 3},
    },
    "jacobian": {"mode": "jacobian", "vectors": None},
}


@pytest.mark.parametrize("job", list(JOBS))
def test_one_mlp_four_ways_gives_the_same_results_on_a_cluster(
    job: str, mlp_files: Path, tmp_path: Path, scheduler_address: str
) -> None:
    if not any(adapters_pkg.available(name) for name in BACKENDS):
        pytest.skip("no autodiff framework is installed")
    results = {}
    for name, function in mlp_sections(mlp_files).items():
        if name != "mlp" and not adapters_pkg.available(name):
            continue
        config = job_config(
            store=f"{name}.zarr",
            name=f"adapters-{name}",
            function={**function, "dtype": "float64"},
            inputs={"kind": "random", "samples": N, "seed": 1},
            chunks={"samples": 16},
            **JOBS[job],
        )
        cfg = config_from_dict(config, tmp_path)
        summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
        assert summary.ok, (name, summary.failures)
        results[name] = jacrun.load(cfg.output.store)
    reference = results.pop("mlp")
    result = JOBS[job]["mode"]  # the result array is named after the mode
    for name, ds in results.items():
        assert ds[result].shape == reference[result].shape, name
        assert rel_err(ds[result].values, reference[result].values) < 1e-10, name
        assert rel_err(ds.y.values, reference.y.values) < 1e-10, name
        attrs = ds.attrs["jacrun"]
        assert attrs["status"] == "complete" and attrs["function"]["n_out"] == SIZES[-1]


@pytest.mark.parametrize("backend", [pytest.param(name, marks=needs[name]) for name in BACKENDS])
def test_kernels_match_the_builtin_mlp_in_process(backend: str, mlp_files: Path) -> None:
    """Per-sample and shared (stride-0) vectors, both modes, Jacobians both ways, float64."""
    sections = mlp_sections(mlp_files)
    reference, f = build_function(sections["mlp"]), build_function(sections[backend])
    assert (f.n_in, f.n_out, f.dtype) == (SIZES[0], SIZES[-1], np.dtype("float64"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, SIZES[0]))
    v, t = rng.standard_normal((5, 3, SIZES[-1])), rng.standard_normal((5, 3, SIZES[0]))
    shared_v = np.broadcast_to(rng.standard_normal((3, SIZES[-1])), v.shape)
    shared_t = np.broadcast_to(rng.standard_normal((3, SIZES[0])), t.shape)
    for method, vectors in (("vjp", v), ("vjp", shared_v), ("jvp", t), ("jvp", shared_t)):
        y, got = getattr(f, method)(x, vectors)
        y_ref, expected = getattr(reference, method)(x, vectors)
        assert rel_err(got, expected) < 1e-12 and rel_err(y, y_ref) < 1e-12
    for strategy in ("rev", "fwd"):
        assert rel_err(f.jacobian(x, strategy)[1], reference.jacobian(x, strategy)[1]) < 1e-12


# ---- gradient checks, per-sample and batched, float32 and float64 ----------------------------


CHECKED = [
    pytest.param(section("torch", f"{HERE}:torch_f", n_in=3), id="torch-per-sample", marks=needs["torch"]),
    pytest.param(section("torch", f"{HERE}:torch_energy", n_in=4), id="torch-scalar", marks=needs["torch"]),
    pytest.param(
        section("torch", "torch.nn:Linear", params={"in_features": 3, "out_features": 2}, n_in=3),
        id="torch-module-class",
        marks=needs["torch"],
    ),
    pytest.param(section("jax", f"{HERE}:jax_f", n_in=3), id="jax-per-sample", marks=needs["jax"]),
    pytest.param(
        section("jax", f"{HERE}:jax_f_batched", n_in=3, batched=True), id="jax-batched", marks=needs["jax"]
    ),
    pytest.param(
        section("autograd", f"{HERE}:autograd_f", n_in=3, batched=True),
        id="autograd",
        marks=needs["autograd"],
    ),
    pytest.param(
        section("autograd", f"{HERE}:make_scaled", params={"c": 3.0}, batched=True),
        id="autograd-factory",
        marks=needs["autograd"],
    ),
]


@pytest.mark.parametrize("spec", CHECKED)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradient_checks_pass(spec: dict[str, Any], dtype: str) -> None:
    f = build_function({**spec, "dtype": dtype})
    x = np.random.default_rng(0).uniform(-1, 1, (6, f.n_in))
    reports = check_spec({**spec, "dtype": dtype}, x)
    assert len(reports) == (2 if dtype == "float32" else 1)
    for report in reports:
        assert report.rows and report.passed, report.to_dict()
    assert f.forward(x).dtype == np.dtype(dtype)


@needs["torch"]
def test_torch_scalar_outputs_are_one_output_and_vjp_is_the_gradient() -> None:
    import torch

    f = build_function(section("torch", f"{HERE}:torch_energy", n_in=4))
    assert f.n_out == 1
    x = np.random.default_rng(1).standard_normal((3, 4))
    _, grad = f.vjp(x, np.ones((3, 1)))
    expected = torch.func.vmap(torch.func.grad(torch_energy))(torch.from_numpy(x)).numpy()
    assert rel_err(grad, expected) < 1e-14


@needs["torch"]
def test_torch_state_dict_from_npz_threads_and_dtype(mlp_files: Path) -> None:
    import torch

    saved = torch.get_num_threads()
    try:
        spec = mlp_sections(mlp_files)["torch"]
        f = build_function(
            {**spec, "weights": str(mlp_files / "state.npz"), "threads": 1, "dtype": "float32"}
        )
        assert torch.get_num_threads() == 1
        assert f.fn.layers[0].weight.dtype == torch.float32 and not f.fn.training
        assert not any(p.requires_grad for p in f.fn.parameters())
        reference = build_function({"kind": "mlp", "sizes": SIZES, "weights": str(mlp_files / "W.npz")})
        x = np.random.default_rng(0).standard_normal((4, SIZES[0]))
        assert rel_err(f.forward(x), reference.forward(x)) < 1e-5
        assert f.forward(x).dtype == np.float32
    finally:
        torch.set_num_threads(saved)


@needs["torch"]
def test_torch_default_threads_follow_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    saved = torch.get_num_threads()
    monkeypatch.setattr(adapters_pkg, "blas_threads", lambda: 1)
    try:
        build_function(section("torch", f"{HERE}:torch_f", n_in=3))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


@needs["jax"]
def test_jax_float64_enables_x64_and_compiles_once_per_block_shape() -> None:
    import jax

    f = build_function(section("jax", f"{HERE}:jax_f", n_in=3))
    assert jax.config.read("jax_enable_x64")
    x = np.random.default_rng(0).standard_normal((7, 3))
    rows = f._vjp[False]
    for _ in range(3):
        f.vjp_batch(x, np.ones((7, 2, 2)))
    assert rows._cache_size() == 2  # the build probe's (2, 1) shape and this block's


# ---- refusals -------------------------------------------------------------------------------


def test_a_missing_backend_fails_validation_with_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in BACKENDS:
        monkeypatch.setitem(sys.modules, adapters_pkg.BACKENDS[name].package, None)  # import fails
        with pytest.raises(ValidationError, match=rf"pip install 'jacrun\[{name}\]'"):
            parse_spec(section(name, f"{HERE}:jax_f", n_in=3, batched=True))
        config = job_config(function=section(name, f"{HERE}:jax_f", n_in=3, batched=True))
        with pytest.raises(ConfigError, match=rf"function.autodiff.*pip install 'jacrun\[{name}\]'"):
            config_from_dict(config, tmp_path)


def test_an_adapter_whose_import_fails_at_build_time_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = parse_spec(section("autograd", f"{HERE}:autograd_f", n_in=3, batched=True))
    monkeypatch.setitem(sys.modules, "jacrun.functions.adapters.autograd", None)
    with pytest.raises(TargetError, match=r"needs autograd.*pip install 'jacrun\[autograd\]'") as info:
        build_function(spec)
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (f"{HERE}:CONSTANT", "a value of type int"),
        ("os:path", "is a module"),
        ("math:sin", "built-in function 'sin'"),
        ("numpy:sin", "ufunc"),
        ("os:system", "built-in function 'system'"),
        ("subprocess:run", "standard library (subprocess)"),
        ("subprocess:Popen", "the class Popen"),
        (f"{HERE}:Hand", "has its own kernels: remove `autodiff`"),
        (f"{HERE}:make_nothing", "returned a value of type int, not a callable"),
    ],
)
@needs["autograd"]
def test_targets_that_are_not_functions_are_refused(target: str, reason: str) -> None:
    with pytest.raises(TargetError) as info:
        build_function(section("autograd", target, n_in=3, batched=True))
    assert reason in str(info.value) and repr(target) in str(info.value)


@needs["autograd"]
def test_nothing_is_called_with_params_unless_it_is_a_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    for target in ("os:system", "subprocess:run"):
        with pytest.raises(TargetError):
            build_function(
                section("autograd", target, params={"command": "echo pwned"}, n_in=1, batched=True)
            )
    with pytest.raises(TargetError, match="plain function f.x., which takes no params.*-> Callable"):
        build_function(section("autograd", f"{HERE}:needs_params", params={"c": 1.0}, n_in=1, batched=True))
    assert calls == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(
            section("jax", f"{HERE}:jax_f", n_in=3, n_out=5),
            r"f returns 2 values per sample \(shape \(2,\) for one sample\), but n_out is 5",
            marks=needs["jax"],
            id="n_out",
        ),
        pytest.param(
            section("jax", f"{HERE}:jax_matrix", n_in=3),
            r"returned shape \(3, 3\); it must return \(m,\) per sample",
            marks=needs["jax"],
            id="matrix",
        ),
        pytest.param(
            section("torch", f"{HERE}:torch_f", n_in=2),
            r"calling f on zeros of shape \(2,\) failed.*is n_in right",
            marks=needs["torch"],
            id="wrong-n_in",
        ),
        pytest.param(
            section("jax", f"{HERE}:jax_f"),
            r"set `n_in:`",
            marks=needs["jax"],
            id="no-n_in",
        ),
        pytest.param(
            section("autograd", f"{HERE}:autograd_centered", n_in=3, batched=True),
            r"couples samples: changing row 0",
            marks=needs["autograd"],
            id="coupled",
        ),
        pytest.param(
            section("autograd", f"{HERE}:autograd_float64", n_in=3, batched=True, dtype="float32"),
            r"f returns float64 for float32 inputs",
            marks=needs["autograd"],
            id="dtype",
        ),
        pytest.param(
            section("jax", f"{HERE}:jax_branchy", n_in=3),
            r"calling f on zeros .*failed",
            marks=needs["jax"],
            id="not-traceable",
        ),
        pytest.param(
            section("torch", f"{HERE}:torch_f", n_in=3, weights=__file__),
            r"weights: needs an nn.Module",
            marks=needs["torch"],
            id="weights-for-a-function",
        ),
    ],
)
def test_bad_functions_are_config_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(TargetError, match=message) as info:
        build_function(spec)
    assert isinstance(info.value, ConfigError) and spec["target"] in str(info.value)


def torch_no_backward(x: Any) -> Any:
    """A custom op with a forward (vmappable) but no backward: torch cannot differentiate it."""
    import torch

    class Sine(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: Any) -> Any:
            return x.sin()

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            pass

    return Sine.apply(x)


def jax_callback(x: Any) -> Any:
    """A host callback: evaluates under vmap and jit, has no derivative rule."""
    import jax

    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x, vmap_method="sequential")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(
            section("torch", f"{HERE}:torch_no_backward", n_in=3),
            "PyTorch cannot compute the vjp of f",
            marks=needs["torch"],
            id="torch",
        ),
        pytest.param(
            section("jax", f"{HERE}:jax_callback", n_in=3),
            "JAX cannot compute the vjp of f",
            marks=needs["jax"],
            id="jax",
        ),
    ],
)
def test_a_function_the_framework_cannot_differentiate_is_refused_at_build_time(
    spec: dict[str, Any], message: str
) -> None:
    f_spec = parse_spec(spec)
    with pytest.raises(TargetError, match=message):
        build_function(f_spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (section("autograd", f"{HERE}:autograd_f", n_in=3), "autograd needs `batched: true`"),
        ({"kind": "python", "target": f"{HERE}:Hand", "n_in": 3}, "only apply with `autodiff"),
        (section("jax", f"{HERE}:jax_f", n_in=3, threads=2), "threads applies to autodiff: torch only"),
        ({"kind": "python", "autodiff": "tensorflow", "target": f"{HERE}:jax_f"}, "autodiff"),
    ],
)
def test_inconsistent_sections_are_validation_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_spec(spec)


def test_the_examples_are_valid_configs() -> None:
    for name in ("torch_mlp", "jax_fn", "autograd_fn"):
        backend = {"torch_mlp": "torch", "jax_fn": "jax", "autograd_fn": "autograd"}[name]
        if not adapters_pkg.available(backend):
            continue
        cfg = jacrun.load_config(EXAMPLES / name / "job.yaml")
        assert cfg.function.autodiff == backend
        assert cfg.output.store == (EXAMPLES / name / "results" / f"{name}.zarr").resolve()
        plan = jacrun.plan(cfg)
        assert plan.samples <= 20_000 and plan.memory_per_block <= plan.task_memory


@needs["jax"]
def test_a_jitted_function_next_to_the_config_is_accepted(tmp_path: Path) -> None:
    name = f"jitted_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import jax
            import jax.numpy as jnp

            @jax.jit
            def f(x):
                return jnp.tanh(x[:2]) * x[2]
            """
        )
    )
    spec = parse_spec(section("jax", f"{name}:f", path=".", n_in=3), base_dir=tmp_path)
    f = build_function(spec)
    assert (f.n_in, f.n_out) == (3, 2)
    x = np.random.default_rng(0).standard_normal((4, 3))
    assert check_spec(spec, x)[0].passed


def test_bench_adapters_returns_one_row_per_installed_adapter() -> None:
    loader = importlib.util.spec_from_file_location("bench_adapters", REPO / "scripts" / "bench_adapters.py")
    assert loader is not None and loader.loader is not None
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    rows = bench.bench_adapters(16, sizes=(4, 8, 2), vectors=2, dtypes=("float64",), repeats=1)
    assert [row["adapter"] for row in rows] == [name for name in BACKENDS if adapters_pkg.available(name)]
    for row in rows:
        assert set(row) == {"adapter", "dtype", "jacrun_per_s", "framework_per_s", "ratio"}
        assert row["jacrun_per_s"] > 0 and row["framework_per_s"] > 0 and row["ratio"] > 0
    assert "| torch | float64 |" in bench.markdown(rows) or not adapters_pkg.available("torch")
