"""Shared fixtures: a real Dask cluster on 127.0.0.1, a real SLURM."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def scheduler_address():
    """A real 2-worker, process-based LocalCluster shared by the pipeline tests."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit="2GiB",
        silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM (tests/slurm.py), started on first use; skipped where it cannot
    start, except under CI=true."""
    from tests.slurm import running_slurm

    yield from running_slurm()
