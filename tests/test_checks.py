"""Gradient checks: correct kernels pass every check; each kind of bug fails the right ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from jacrun.checks import CHECKS, TOLERANCES, CheckReport, CheckResult, check, check_spec
from jacrun.functions import Function

HERE = __name__
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin"


class TanhLayer(Function):
    """y = tanh(W x + b), with switches for deliberate bugs."""

    def __init__(
        self,
        n_in: int = 5,
        n_out: int = 3,
        seed: int = 0,
        dtype: np.dtype | str = "float64",
        vjp_scale: float = 1.0,
        jvp_scale: float = 1.0,
        transposed_vjp: bool = False,
        couple_rows: bool = False,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.n_in, self.n_out, self.dtype = n_in, n_out, np.dtype(dtype)
        self.w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(self.dtype)
        self.b = rng.standard_normal(n_out).astype(self.dtype)
        self.vjp_scale, self.jvp_scale = vjp_scale, jvp_scale
        self.transposed_vjp, self.couple_rows = transposed_vjp, couple_rows

    def _slope(self, x: np.ndarray) -> np.ndarray:
        return (1 - np.tanh(x @ self.w.T + self.b) ** 2)[:, None, :]

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        y = np.tanh(x @ self.w.T + self.b)
        return y - y.mean(axis=0) if self.couple_rows else y

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = self.w.T if self.transposed_vjp else self.w  # transposed: J v instead of J^T v
        xbar = (self._slope(x) * v) @ w * self.dtype.type(self.vjp_scale)
        return self.forward_batch(x), xbar

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ydot = self._slope(x) * (t @ self.w.T) * self.dtype.type(self.jvp_scale)
        return self.forward_batch(x), ydot


class WritesIntoVectors(TanhLayer):
    """Scales v in place: breaks on the read-only broadcast views jacrun hands out."""

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v *= self._slope(x)
        return self.forward_batch(x), v @ self.w


class WrongShapes(TanhLayer):
    """Returns (B, m) from jvp instead of (B, K, m), and float64 from a float32 function."""

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y, ydot = super().jvp_batch(x, t)
        return y.astype(np.float64), ydot[:, 0]


class Float32Only(TanhLayer):
    """No dtype parameter: cannot be rebuilt in float64 for the recheck."""

    def __init__(self, n_in: int = 5, n_out: int = 3) -> None:
        super().__init__(n_in, n_out, dtype="float32")


def batch(n: int, rows: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, n))


def rows(report: CheckReport) -> dict[str, CheckResult]:
    return {row.name: row for row in report.rows}


def failed(report: CheckReport) -> set[str]:
    return {row.name for row in report.rows if not row.passed}


# ---- correct functions pass ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("n_in", "n_out"), [(5, 3), (3, 7), (200, 150)])
def test_a_correct_function_passes_every_check(dtype: str, n_in: int, n_out: int) -> None:
    f = TanhLayer(n_in, n_out, dtype=dtype)
    for seed in range(3):
        report = check(f, batch(n_in, seed=seed), vectors=3, seed=seed)
        assert report.passed, report.to_dict()
        assert [row.name for row in report.rows] == list(CHECKS)
        assert report.worst < 0.1  # with a wide margin
        assert report.dtype == report.label == dtype


def test_wide_functions_compare_a_subset_of_the_jacobian() -> None:
    report = check(TanhLayer(200, 150), batch(200))
    assert "J[64 of 150 outputs, 64 of 200 inputs]" in rows(report)["basis"].detail


# ---- each bug fails the right checks -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_vjp_off_by_one_percent_fails_dot_product_and_basis(dtype: str) -> None:
    report = check(TanhLayer(dtype=dtype, vjp_scale=1.01), batch(5))
    assert failed(report) == {"dot_product", "basis"}
    for name in ("dot_product", "basis"):
        assert rows(report)[name].error == pytest.approx(0.01 / 1.01, rel=0.05)
    assert not report.passed
    assert report.worst > 1


def test_a_transposed_jacobian_fails_dot_product_and_basis() -> None:
    report = check(TanhLayer(4, 4, transposed_vjp=True), batch(4))
    assert failed(report) == {"dot_product", "basis"}
    assert rows(report)["basis"].error > 0.1


@pytest.mark.parametrize(("dtype", "scale"), [("float64", 1.01), ("float32", 1.05)])
def test_a_wrong_jvp_fails_finite_differences(dtype: str, scale: float) -> None:
    """float32 differences resolve 1e-2 (its tolerance): a 1 % bug needs the float64 recheck."""
    report = check(TanhLayer(dtype=dtype, jvp_scale=scale), batch(5))
    assert {"finite_differences", "dot_product", "basis"} <= failed(report)
    assert rows(report)["finite_differences"].error == pytest.approx((scale - 1) / scale, rel=0.1)


def test_consistently_wrong_vjp_and_jvp_fail_only_finite_differences() -> None:
    report = check(TanhLayer(vjp_scale=1.001, jvp_scale=1.001), batch(5))
    assert failed(report) == {"finite_differences"}
    assert rows(report)["finite_differences"].error == pytest.approx(1e-3, rel=0.1)


def test_coupled_samples_fail_row_independence() -> None:
    report = check(TanhLayer(couple_rows=True), batch(5, rows=6))
    assert "row_independence" in failed(report)
    assert rows(report)["row_independence"].error == pytest.approx(1 / 5, rel=0.5)  # 1/(B-1)
    assert "moved row" in rows(report)["row_independence"].detail


def test_a_kernel_that_writes_into_its_vectors_fails_with_the_reason() -> None:
    report = check(WritesIntoVectors(), batch(5))
    shapes = rows(report)["shapes"]
    assert not shapes.passed
    assert "vjp raised ValueError: output array is read-only" in shapes.detail
    assert rows(report)["dot_product"].error == float("inf")


def test_wrong_shapes_and_dtypes_are_listed() -> None:
    report = check(WrongShapes(dtype="float32"), batch(5))
    shapes = rows(report)["shapes"]
    assert shapes.error == 2
    assert "jvp[0] has dtype float64, expected float32" in shapes.detail
    assert "jvp[1] has shape (8, 3), expected (8, 2, 3)" in shapes.detail


# ---- specs and the float64 recheck ---------------------------------------------------------------


def test_a_float32_spec_is_rechecked_in_float64() -> None:
    spec = {"kind": "python", "target": f"{HERE}:TanhLayer", "params": {"n_in": 5}, "dtype": "float32"}
    reports = check_spec(spec, batch(5))
    assert [(r.label, r.dtype) for r in reports] == [("float32", "float32"), ("float64 recheck", "float64")]
    assert all(r.passed for r in reports)
    assert rows(reports[0])["dot_product"].tolerance == TOLERANCES["float32"]["dot_product"]
    assert rows(reports[1])["dot_product"].tolerance == TOLERANCES["float64"]["dot_product"]


def test_a_float64_spec_is_checked_once() -> None:
    reports = check_spec({"kind": "python", "target": f"{HERE}:TanhLayer"}, batch(5))
    assert [r.label for r in reports] == ["float64"]


def test_a_recheck_that_cannot_be_built_is_noted_not_failed() -> None:
    spec = {"kind": "python", "target": f"{HERE}:Float32Only", "dtype": "float32"}
    first, recheck = check_spec(spec, batch(5))
    assert first.passed and recheck.passed and recheck.rows == ()
    assert "skipped, cannot build in float64" in recheck.note


def test_tolerances_can_be_overridden_by_name() -> None:
    f = TanhLayer(vjp_scale=1.01)
    assert check(f, batch(5), tolerances={"dot_product": 0.1, "basis": 0.1}).passed
    with pytest.raises(ValueError, match="unknown checks"):
        check(f, batch(5), tolerances={"dot": 0.1})


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((1, 5)), "at least 2 samples"),
        (np.zeros((4, 6)), "shape"),
        (np.full((2, 5), np.nan), "non-finite"),
    ],
)
def test_bad_batches_are_refused(x: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(TanhLayer(), x)


# ---- reporting -----------------------------------------------------------------------------------


def test_reports_are_json_and_render_as_a_table() -> None:
    good = check(TanhLayer(), batch(5))
    bad = check(WritesIntoVectors(), batch(5))
    for report in (good, bad):
        data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
        assert data["passed"] == report.passed
        assert [c["name"] for c in data["checks"]] == list(CHECKS)
    assert json.loads(json.dumps(bad.to_dict()))["worst"] is None  # inf is not JSON
    console = Console(record=True, width=220)
    console.print(good.table())
    console.print(bad.table())
    text = console.export_text()
    assert "finite_differences" in text and "pass" in text and "FAIL" in text
    assert "output array is read-only" in text


def test_checks_import_neither_dask_nor_zarr() -> None:
    code = "import sys, jacrun.checks; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.replace("'", '"')))
    assert not loaded & {"dask", "distributed", "zarr", "xarray"}


# ---- the example plugin --------------------------------------------------------------------------


@pytest.fixture
def plugin_section() -> dict[str, object]:
    config = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    return config["function"]


def test_the_example_job_names_the_plugin(plugin_section: dict[str, object]) -> None:
    config = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    assert plugin_section["kind"] == "python" and plugin_section["path"] == "."
    assert config["mode"] == "vjp" and config["output"]["store"] == "results/plugin.zarr"
    assert config["cluster"] == {**config["cluster"], "kind": "local", "workers": 2}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_example_plugin_passes_every_check(plugin_section: dict[str, object], dtype: str) -> None:
    reports = check_spec({**plugin_section, "dtype": dtype}, batch(64, rows=6), vectors=3, base_dir=EXAMPLE)
    assert len(reports) == (2 if dtype == "float32" else 1)
    for report in reports:
        assert report.rows and report.passed, report.to_dict()


def test_the_example_plugin_is_accurate_for_a_confident_classifier(plugin_section: dict[str, object]) -> None:
    """Nearly one-hot probabilities: the top-class shift keeps the adjoint test tight."""
    params = {**plugin_section["params"], "temperature": 0.05}
    (report,) = check_spec({**plugin_section, "params": params}, batch(64), base_dir=EXAMPLE)
    assert report.passed, report.to_dict()
    assert rows(report)["dot_product"].error < 1e-13
