"""Shared fixtures: a real Dask cluster on 127.0.0.1, a real SLURM."""

from __future__ import annotations

import logging

import pytest

LONGEST_FIRST = (
    "test_slurm.py",
    "test_s3.py",
    "test_bench.py",
    "test_cli.py",
    "test_sparse.py",
    "test_faults.py",
    "test_adapters.py",
    "test_reduce.py",
    "test_fused_sparse.py",
    "test_check_cli.py",
)
"""The modules whose tests take longest in all (``pytest --durations=0``: 20-110 s each), in
that order. With ``--dist loadfile`` a module goes whole to the next free test process, and
xdist's default order (most tests first) handed out the 13 SLURM tests (110 s) late. Longest
first, one run's 574 s of tests took 301 s on 2 processes; before, 612 s took 320-352 s."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of :data:`LONGEST_FIRST` first, in its order; the rest as collected."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
