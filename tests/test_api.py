"""The public Python API of design section 5, as scripts and notebooks use it."""

from __future__ import annotations

import numpy as np

import jacrun
from tests.helpers import job_config, write_config


def test_public_api_round_trip(tmp_path, scheduler_address):
    path = write_config(tmp_path, job_config())
    cfg = jacrun.load_config(path, overrides={"chunks.samples": 50})
    plan = jacrun.plan(cfg)
    assert isinstance(plan, jacrun.Plan) and plan.grid == (2, 1)
    assert jacrun.plan(path).grid == (4, 1)  # a path works too; the file says 32 rows per block
    assert not (tmp_path / "out.zarr").exists()  # planning writes nothing

    reports = jacrun.check_job(cfg, samples=4)
    assert all(report.passed for report in reports)

    summary = jacrun.submit(cfg, scheduler=scheduler_address, progress=False)
    assert summary.ok and summary.blocks_total == 2
    ds = jacrun.load(summary.store)
    assert ds.vjp.dims == ("sample", "vector", "input")

    f = jacrun.build_function({"kind": "mlp", "sizes": [4, 8, 2], "seed": 0})
    x = np.random.default_rng(0).normal(size=(5, 4))
    y, xbar = f.vjp(x, np.ones((5, 2)))
    assert y.shape == (5, 2) and xbar.shape == (5, 4)
    assert jacrun.check(f, x).passed


def test_submit_records_library_versions_without_importing_xarray():
    """The store names the versions that wrote it; xarray's comes from its metadata, because
    importing it (and pandas) would cost every `jacrun submit` about 0.3 s."""
    import subprocess
    import sys

    import xarray

    script = (
        "import sys, json; from jacrun.runner import library_versions; v = library_versions(); "
        "print(json.dumps([v['xarray'], 'xarray' in sys.modules, 'pandas' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f'["{xarray.__version__}", false, false]'
