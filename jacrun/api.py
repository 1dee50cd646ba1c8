"""Library entry points, re-exported by ``jacrun``: plan, submit, load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jacrun.config import JobConfig, load_config
from jacrun.plan import Plan


def _config(config: JobConfig | str | Path) -> JobConfig:
    return config if isinstance(config, JobConfig) else load_config(config)


def plan(config: JobConfig | str | Path) -> Plan:
    """The job's frozen Plan (block grid, projected memory, FLOPs and runtime estimate); starts
    and writes nothing."""
    from jacrun.prepare import prepare

    return prepare(_config(config), estimate=True).plan


def submit(config: JobConfig | str | Path, **options: Any):
    """Run a job; see :func:`jacrun.runner.submit` for options. Returns a Summary."""
    from jacrun.runner import submit as run

    return run(_config(config), **options)


def check_job(config: JobConfig | str | Path, *, samples: int = 8, vectors: int = 2, seed: int = 0):
    """Gradient checks of a job's function on the first ``samples`` rows of its inputs.

    Returns a list of :class:`jacrun.checks.CheckReport` (a float32 function gets a float64
    recheck). Starts no cluster and writes nothing.
    """
    import numpy as np

    from jacrun.checks import check_spec
    from jacrun.errors import ConfigError
    from jacrun.prepare import build
    from jacrun.sources import open_inputs

    config = _config(config)
    function = build(config)
    inputs = open_inputs(config.inputs, function.n_in)
    rows = min(max(samples, 2), inputs.shape[0])
    if rows < 2:
        raise ConfigError("check: the inputs need at least 2 samples")
    x = inputs.read(0, rows, np.dtype("float64"))
    if not np.isfinite(x).all():
        raise ConfigError(f"check: the first {rows} input samples contain non-finite values")
    return check_spec(config.function, x, vectors=vectors, seed=seed)


def load(store: str | Path, **options: Any):
    """Open a job's store as a lazy xarray Dataset; warns if the job is incomplete."""
    from jacrun.store import load as open_store

    return open_store(store, **options)
