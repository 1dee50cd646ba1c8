"""Everything known about a job before any cluster starts or store is touched.

``prepare(config)`` builds the function, opens the input and vector readers (checking their
shapes against the function) and plans the block grid. Any problem is a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jacrun.config import AddressClusterConfig, JobConfig
from jacrun.errors import ConfigError
from jacrun.functions import Function, build_function, resolve_strategy
from jacrun.plan import Plan, make_plan
from jacrun.sources import (
    ArrayRows,
    RandomRows,
    VectorSource,
    basis_source,
    open_inputs,
    open_vectors,
)


@dataclass(frozen=True)
class PreparedJob:
    """A validated job: config, function, readers and plan. Picklable, sent to every block."""

    config: JobConfig
    function: Function
    inputs: RandomRows | ArrayRows
    vectors: VectorSource
    plan: Plan

    @property
    def config_hash(self) -> str:
        return self.config.content_hash()


def build(config: JobConfig) -> Function:
    """The job's function; a build failure is the user's config problem."""
    try:
        return build_function(config.function)
    except (ValueError, TypeError, OSError, KeyError) as exc:
        raise ConfigError(f"function: {exc}") from None


def prepare(config: JobConfig, function: Function | None = None) -> PreparedJob:
    """Build, open, check and plan; raise ConfigError on any mismatch."""
    function = function or build(config)
    inputs = open_inputs(config.inputs, function.n_in)
    samples = inputs.shape[0]
    strategy = None
    if config.mode == "jacobian":
        strategy = resolve_strategy(config.strategy, function.n_in, function.n_out)
        vectors = basis_source(function.n_out if strategy == "rev" else function.n_in)
    else:
        width = function.n_out if config.mode == "vjp" else function.n_in
        vectors = open_vectors(config.vectors, width, samples)
    cluster = config.cluster
    workers = 1 if isinstance(cluster, AddressClusterConfig) else cluster.workers
    worker_memory = None if isinstance(cluster, AddressClusterConfig) else int(cluster.memory_limit)
    kernel_mode = config.mode if config.mode != "jacobian" else ("vjp" if strategy == "rev" else "jvp")
    plan = make_plan(
        mode=config.mode,
        samples=samples,
        n_in=function.n_in,
        n_out=function.n_out,
        vectors=vectors.count,
        vector_dim=not vectors.squeeze,
        shared_vectors=vectors.shared,
        strategy=strategy,
        compute_itemsize=np.dtype(config.compute_dtype).itemsize,
        output_itemsize=np.dtype(config.output_dtype).itemsize,
        save_outputs=config.output.save_outputs,
        chunk_samples=config.chunks.samples,
        chunk_vectors=config.chunks.vectors,
        task_memory=int(config.chunks.task_memory),
        worker_memory=worker_memory,
        workers=workers,
        work_bytes=lambda rows, k: function.work_bytes(rows, k, kernel_mode),
        flops=lambda rows, k: function.flops(rows, k, kernel_mode),
    )
    return PreparedJob(config, function, inputs, vectors, plan)
