"""Library entry points, re-exported by ``jacrun``: plan, submit, load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jacrun.config import JobConfig, load_config
from jacrun.plan import Plan


def _config(config: JobConfig | str | Path) -> JobConfig:
    return config if isinstance(config, JobConfig) else load_config(config)


def plan(config: JobConfig | str | Path) -> Plan:
    """The job's frozen Plan (block grid, projected memory and FLOPs); starts and writes nothing."""
    from jacrun.prepare import prepare

    return prepare(_config(config)).plan


def submit(config: JobConfig | str | Path, **options: Any):
    """Run a job; see :func:`jacrun.runner.submit` for options. Returns a Summary."""
    from jacrun.runner import submit as run

    return run(_config(config), **options)


def load(store: str | Path, **options: Any):
    """Open a job's store as a lazy xarray Dataset; warns if the job is incomplete."""
    from jacrun.store import load as open_store

    return open_store(store, **options)
