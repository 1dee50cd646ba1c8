"""``kind: python`` with ``autodiff`` takes ``n_in`` from inputs in a file, and checks it when given."""

from __future__ import annotations

import re
import textwrap
import uuid

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from jacrun.cli import app
from tests.helpers import fresh_targets, job_config, run_cli, write_config  # noqa: F401 - autouse fixture

pytest.importorskip("autograd")

MODULE = """
from collections.abc import Callable

import autograd.numpy as anp


def f(x):
    return 2.0 * anp.tanh(x)


def make(n: int) -> Callable:
    def g(x):
        return 2.0 * anp.tanh(x)

    g.n_in = n
    return g
"""

runner = CliRunner()


def autodiff_job(tmp_path, inputs: dict, **function) -> dict:
    module = f"tanh_{uuid.uuid4().hex[:12]}"  # one module of a name per process: a fresh name per job
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(MODULE))
    function = {"target": "f", **function}
    function["target"] = f"{module}:{function['target']}"
    section = {"kind": "python", "autodiff": "autograd", "batched": True, "path": "."}
    return job_config(
        function={**section, **function}, inputs=inputs, vectors={"kind": "ones"}, chunks={"samples": 12}
    )


def test_a_job_without_n_in_runs_on_npy_inputs(tmp_path):
    x = np.random.default_rng(0).standard_normal((24, 4))
    np.save(tmp_path / "x.npy", x)
    path = write_config(tmp_path, autodiff_job(tmp_path, {"kind": "npy", "path": "x.npy"}))
    result = run_cli("submit", str(path), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert np.allclose(group["y"][...], 2.0 * np.tanh(x))
    vjp = np.asarray(group["vjp"]).reshape(24, 4)  # ones^T J, with J = diag(2 (1 - tanh(x)^2))
    assert np.allclose(vjp, 2.0 * (1.0 - np.tanh(x) ** 2))


def test_check_takes_n_in_from_npy_inputs_as_submit_does(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((24, 4)))
    path = write_config(tmp_path, autodiff_job(tmp_path, {"kind": "npy", "path": "x.npy"}))
    result = run_cli("check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "n_in=4" in result.stdout and "all checks passed" in result.stdout


def test_zarr_inputs_fix_n_in(tmp_path):
    array = zarr.open_group(str(tmp_path / "in.zarr"), mode="w").create_array("x", shape=(20, 6), dtype="f8")
    array[...] = np.ones((20, 6))
    path = write_config(tmp_path, autodiff_job(tmp_path, {"kind": "zarr", "path": "in.zarr", "array": "x"}))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "(6 -> 6)" in result.output


@pytest.mark.parametrize(
    ("function", "inputs", "message"),
    [
        (
            {"n_in": 3},
            {"kind": "npy", "path": "x.npy"},
            r"function\.n_in: 3, but inputs\.path .* has 4 columns",
        ),
        (
            {"target": "make", "params": {"n": 5}},
            {"kind": "npy", "path": "x.npy"},
            r"the callable's n_in attribute is 5, but the job's n_in is 4",
        ),
        ({}, {"kind": "random", "samples": 10}, r"set `n_in:` in the function section"),
    ],
)
def test_n_in_that_disagrees_or_is_unknown_is_refused(tmp_path, function, inputs, message):
    np.save(tmp_path / "x.npy", np.ones((10, 4)))
    path = write_config(tmp_path, autodiff_job(tmp_path, inputs, **function))
    for command in ("validate", "submit"):
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert re.search(message, result.output), result.output
    assert not (tmp_path / "out.zarr").exists()
