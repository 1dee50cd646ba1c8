"""The report's header (machine, software, BLAS, the workers' settings) and its targets table."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import jacrun_bench
from jacrun_bench.common import Target
from jacrun_bench.frameworks import FRAMEWORKS, usable


def blas_info() -> tuple[str, list[dict[str, Any]]]:
    """The threadpoolctl table of this process's thread pools, and its BLAS pools."""
    from threadpoolctl import threadpool_info

    np.ones((2, 2)) @ np.ones((2, 2))  # loads the BLAS
    pools = threadpool_info()
    blas = [p for p in pools if p.get("user_api") == "blas"]
    lines = [
        "| library | version | kernel (architecture) | threads | threading | file |",
        "|---|---|---|---:|---|---|",
    ]
    for pool in pools:
        lines.append(
            f"| {pool.get('internal_api')} ({pool.get('user_api')}) | {pool.get('version')} | "
            f"{pool.get('architecture', '-')} | {pool.get('num_threads')} | "
            f"{pool.get('threading_layer', '-')} | {Path(pool.get('filepath', '')).name} |"
        )
    return "\n".join(lines), blas


def blas_kernel(blas: Sequence[dict[str, Any]]) -> str:
    """'openblas 0.3.31 SkylakeX', or 'unknown'."""
    kernel = ", ".join(f"{p['internal_api']} {p['version']} {p.get('architecture', '')}" for p in blas)
    return kernel or "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.platform()


def _hugepages() -> str:
    """Whether NumPy asks for huge pages in this process (its switch is private: 'unknown')."""
    try:
        from numpy._core.multiarray import _get_madvise_hugepage
    except ImportError:
        return "unknown"
    return "on" if _get_madvise_hugepage() else "off"


def worker_settings() -> str:
    """What the benchmark's workers run with: jacrun's malloc thresholds, Dask's intervals as
    a local cluster of jacrun's gets them, and a ``GLIBC_TUNABLES`` from the environment."""
    import dask

    from jacrun import memory
    from jacrun.cluster import local_worker_settings

    with local_worker_settings():
        profile = dask.config.get("distributed.worker.profile.interval")
        tick = dask.config.get("distributed.admin.tick.interval")
    line = (
        f"malloc serves arrays under {memory.MMAP_THRESHOLD >> 20} MiB from its heap and keeps "
        f"{memory.TRIM_THRESHOLD >> 20} MiB of freed heap (`jacrun.memory`); Dask's profiler every "
        f"{profile}, its event-loop tick every {tick}"
    )
    if "GLIBC_TUNABLES" in os.environ:
        line += f"; GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}, inherited from your environment"
    return line


def environment(frameworks: dict[str, str]) -> str:
    """The machine, the software and the settings the numbers depend on, as markdown bullets."""
    user = jacrun_bench.USER_HUGEPAGE
    lines = [
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
        f"- python {platform.python_version()}, numpy {np.__version__}; huge pages for large "
        f"arrays {_hugepages()} in this process; on the cluster's workers "
        + (
            "NumPy's default"
            if user is None
            else f"NUMPY_MADVISE_HUGEPAGE={user}, inherited from your environment"
        )
        + " (see jacrun_bench.numpy_without_huge_pages)",
        f"- the cluster's workers: {worker_settings()}",
    ]
    for name in FRAMEWORKS:
        lines.append(f"- {name}: {frameworks[name]}")
    if usable(frameworks["torch"]):
        import torch

        lines[-3] += f", {torch.get_num_threads()} intra-op threads"
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if var in os.environ:
            lines.append(
                f"- **{var}={os.environ[var]}** is set (run with `env -u {var}` for the real numbers)"
            )
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    """The targets, each with the measured value and whether it is met."""
    return "\n".join(["| target | measured | met |", "|---|---|---|", *(t.row() for t in targets)])
