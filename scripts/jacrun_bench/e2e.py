"""Section ``e2e``: ``jacrun.submit`` on a local cluster against the in-process kernel.

The cluster jobs (N and 8N samples with zstd, 8N with blosc and without compression,
per-sample Jacobians) run on a LocalCluster of 2 worker processes x 1 thread, each on fresh
workers, their memory sampled (the ``memory`` section reports it). The in-process kernel they
are compared with is measured while no cluster runs. Then, in this process: the job's whole
blocks one after the other (``jacrun.block.run_block`` with all BLAS threads), and one block as
a worker runs it (``run_block``, 1 BLAS thread) with each ``output.compression``: its steps and
its write.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jacrun_bench.common import Context, Log, Shapes, Target, rounds, steps_table
from jacrun_bench.memory import RssSampler, warm_worker

NAME = "e2e"
TITLE = "End to end"
HELP = "skip the cluster jobs"

COMPRESSIONS = ("zstd", "blosc", "none")


@dataclass
class Job:
    samples: int
    blocks: int
    rows_per_block: int
    result_bytes: int
    seconds: float
    ok: bool
    idle_rss: int  # the largest worker's resident memory before the job
    peak_rss: int  # the largest worker's peak resident memory during the job
    peak_increase: int  # the largest (peak - idle) over the workers
    projected: int  # plan: projected memory per block
    block_seconds: dict[str, float] = field(default_factory=dict)  # workers' seconds per block step
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the workers, this process


def e2e_config(
    shapes: Shapes, samples: int, store: Path, address: str, mode: str = "vjp", compression: str = "zstd"
) -> dict[str, Any]:
    """The end-to-end job: the vjp of 1 random cotangent per sample, or (``mode: jacobian``)
    full per-sample Jacobians."""
    config: dict[str, Any] = {
        "name": f"bench-e2e-{mode}-{samples}",
        "mode": mode,
        "function": {
            "kind": "mlp",
            "sizes": list(shapes.e2e_sizes),
            "activation": "tanh",
            "seed": 0,
            "dtype": "float32",
        },
        "inputs": {"kind": "random", "samples": samples, "distribution": "normal", "seed": 1},
        "vectors": {"kind": "random", "distribution": "normal", "count": 1, "shared": False, "seed": 2},
        "output": {"store": str(store), "save_outputs": True, "compression": compression, "overwrite": True},
        "chunks": {"samples": shapes.e2e_block, "vectors": "auto", "task_memory": "256MiB"},
        "cluster": {"kind": "address", "address": address},
    }
    if mode == "jacobian":
        del config["vectors"]
        config["chunks"] = {"samples": shapes.e2e_jacobian_block, "vectors": "auto", "task_memory": "1GiB"}
    return config


def run_job(
    shapes: Shapes,
    samples: int,
    folder: Path,
    address: str,
    pids: Sequence[int],
    keep: bool = False,
    **variant: str,
) -> Job:
    """One job through ``jacrun.submit``, its workers' memory sampled; the store is deleted
    unless ``keep``. ``variant``: mode and compression (see :func:`e2e_config`)."""
    import jacrun
    from jacrun.store import read_attrs

    store = folder / f"e2e-{samples}{''.join('-' + v for v in variant.values())}.zarr"
    config = jacrun.config_from_dict(e2e_config(shapes, samples, store, address, **variant))
    sampler = RssSampler(pids)
    idle = sampler.current()
    with sampler:
        start = time.perf_counter()
        summary = jacrun.submit(config, progress=False, overwrite=True)
        seconds = time.perf_counter() - start
    attrs = read_attrs(store)
    plan = attrs["plan"]
    job = Job(
        samples=samples,
        blocks=plan["n_blocks"],
        rows_per_block=plan["samples_per_block"],
        result_bytes=plan["output_bytes"],
        seconds=seconds,
        ok=summary.ok,
        idle_rss=max(idle.values()),
        peak_rss=max(sampler.peak.values()),
        peak_increase=max(sampler.peak[pid] - idle[pid] for pid in idle),
        projected=plan["memory_per_block"],
        block_seconds=(attrs.get("throughput") or {}).get("block_seconds", {}),
        cpu=sampler.cpu,
    )
    if not keep:
        shutil.rmtree(store, ignore_errors=True)
    return job


def in_process_rate(shapes: Shapes, rows: int, reps: int, mode: str = "vjp") -> float:
    """Samples per second of the job's kernel alone, in this process, on a block of ``rows``
    (``jacobian``: the reverse sweep over the output basis that its blocks run)."""
    from jacrun.functions import build_function

    spec = e2e_config(shapes, rows, Path("unused"), "tcp://unused:0")["function"]
    f = build_function(spec)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, f.n_in)).astype(f.dtype)
    if mode == "jacobian":
        kernel = lambda: f.jacobian(x, "rev")  # noqa: E731
    else:
        v = rng.standard_normal((rows, 1, f.n_out)).astype(f.dtype)
        kernel = lambda: f.vjp_batch(x, v)  # noqa: E731
    seconds = rounds({"kernel": kernel}, reps)["kernel"]
    return rows / seconds


def block_job(config: dict[str, Any], blas_threads: int, overwrite: bool = False):  # noqa: ANN201
    """The ``jacrun.block.BlockJob`` of a job config, as the runner sends it to every block; with
    ``overwrite`` its store is created afresh, otherwise it must exist."""
    import jacrun
    from jacrun.block import BlockJob
    from jacrun.prepare import prepare
    from jacrun.runner import open_output

    job = prepare(jacrun.config_from_dict(config), calibrate=False)
    if overwrite:
        job = open_output(job, overwrite=True)
    return BlockJob(
        config=job.config,
        config_hash=job.config_hash,
        plan=job.plan,
        inputs=job.inputs,
        vectors=job.vectors,
        store=str(job.config.output.store),
        blas_threads=blas_threads,
    )


def in_process_pipeline_rate(shapes: Shapes, samples: int, store: Path, blocks: int = 4) -> float:
    """Samples per second of whole blocks of the job (``run_block``: generate x and v, kernel,
    finiteness, write), one after the other in this process with all BLAS threads: the same
    work as the cluster does, without Dask. Rewrites blocks of the finished store (idempotent)."""
    from jacrun.block import run_block

    job = block_job(e2e_config(shapes, samples, store, "tcp://127.0.0.1:1"), os.cpu_count() or 1)
    run_block(job, 0, 0)  # warm-up
    blocks = min(blocks, job.plan.grid[0] - 1)
    start = time.perf_counter()
    rows = sum(run_block(job, i, 0).rows for i in range(1, blocks + 1))
    return rows / (time.perf_counter() - start)


def block_costs(
    shapes: Shapes, folder: Path, reps: int
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """One block of the job as a worker runs it (``jacrun.block.run_block``, 1 BLAS thread), in
    this process, in a two-block store per ``output.compression``: the median seconds of each of
    its steps with the first codec (zstd), and per codec (write seconds, stored bytes / raw bytes)."""
    from threadpoolctl import threadpool_limits

    from jacrun.block import run_block

    steps: dict[str, float] = {}
    codecs: dict[str, tuple[float, float]] = {}
    with threadpool_limits(limits=1):  # and this process's BLAS threads as they were afterwards
        for compression in COMPRESSIONS:
            store = folder / f"codec-{compression}.zarr"
            config = e2e_config(
                shapes, 2 * shapes.e2e_block, store, "tcp://127.0.0.1:1", compression=compression
            )
            job = block_job(config, blas_threads=1, overwrite=True)
            run_block(job, 0, 0)  # warm-up: the function and its work buffers
            runs = [run_block(job, 0, 0).steps for _ in range(reps)]
            median = {step: statistics.median(run[step] for run in runs) for step in runs[0]}
            stored = sum(
                path.stat().st_size
                for name in (job.plan.result_name, "y")
                for path in (store / name).rglob("*")
                if path.is_file() and path.name != "zarr.json"
            )
            raw = job.plan.output_bytes / job.plan.n_blocks  # both blocks have the same rows
            codecs[compression] = (median["write"], stored / raw)
            steps = steps or median
            shutil.rmtree(store, ignore_errors=True)
    return steps, codecs


@dataclass
class EndToEnd:
    cluster_start: float
    small: Job
    large: Job
    kernel_rates: list[float]
    """Each measurement of the in-process kernel, taken while no cluster runs (one before the
    jobs, two after); ``kernel_rate`` is their median: one measurement on a shared machine
    moves a ratio by several points."""
    steps: dict[str, float] = field(default_factory=dict)
    """Seconds of each step (``jacrun.block.STEPS``) of one block in this process, 1 BLAS thread."""
    pipeline_rate: float = math.nan
    """Samples/s of the job's whole block pipeline (sources, kernel, checks, write), in process."""
    uncompressed: Job | None = None
    """The 8N job with ``compression: none``."""
    blosc: Job | None = None
    """The 8N job with ``compression: blosc`` (lz4, bitshuffle)."""
    jacobian: Job | None = None
    """Per-sample Jacobians, a job writing as much as 8N."""
    jacobian_kernel_rates: list[float] = field(default_factory=list)
    """The in-process Jacobian kernel, measured with no cluster running: once before the jobs
    and once after (``jacobian_kernel_rate`` is their median)."""
    codecs: dict[str, tuple[float, float]] = field(default_factory=dict)
    """compression -> (seconds to write one block, stored / raw bytes)."""

    @property
    def kernel_rate(self) -> float:
        return statistics.median(self.kernel_rates)

    @property
    def jacobian_kernel_rate(self) -> float:
        return statistics.median(self.jacobian_kernel_rates) if self.jacobian_kernel_rates else math.nan

    @property
    def rate(self) -> float:
        return self.large.samples / self.large.seconds

    @property
    def ratio(self) -> float:
        return self.rate / self.kernel_rate

    def ratio_of(self, job: Job | None) -> float | None:
        """A variant job's samples/s against its own in-process kernel."""
        if job is None:
            return None
        kernel = self.jacobian_kernel_rate if job is self.jacobian else self.kernel_rate
        return job.samples / job.seconds / kernel

    @property
    def ratio_with_start(self) -> float:
        return self.large.samples / (self.large.seconds + self.cluster_start) / self.kernel_rate


Cluster = tuple[str, Callable[[], Sequence[int]], float]
"""(scheduler address, a callable that restarts the workers and returns their pids, seconds
the cluster took to start)."""


def measure_e2e(
    shapes: Shapes,
    cluster: Callable[[], contextlib.AbstractContextManager[Cluster]],
    log: Log,
) -> EndToEnd:
    """The cluster jobs (N, 8N, 8N with blosc and without compression, Jacobians), each on
    fresh workers, inside ``cluster()``; the in-process kernels before and after it, while no
    cluster runs (idle Dask workers and a scheduler in this process cost the kernel 3-5%, up
    to 15% right after a job: a baseline measured beside them flatters every ratio); then the
    in-process pipeline on the 8N job's store, and one block's steps and codecs."""
    folder = Path(tempfile.mkdtemp(prefix="jacrun-bench-"))
    large_n = 8 * shapes.e2e_samples
    try:

        def vjp_rate() -> float:
            return in_process_rate(shapes, shapes.e2e_block, shapes.reps)

        def jacobian_rate() -> float:
            return in_process_rate(shapes, shapes.e2e_jacobian_block, max(3, shapes.reps - 2), "jacobian")

        log("  in-process kernels, before the cluster starts")
        kernel_rates, jacobian_rates = [vjp_rate()], [jacobian_rate()]
        with cluster() as (address, fresh_workers, cluster_start):
            log(f"  cluster up in {cluster_start:.1f} s; job of {shapes.e2e_samples} samples")
            small = run_job(shapes, shapes.e2e_samples, folder, address, fresh_workers())
            log(f"  {small.seconds:.1f} s; job of {large_n} samples")
            large = run_job(shapes, large_n, folder, address, fresh_workers(), keep=True)
            log(f"  {large.seconds:.1f} s; the same job with compression: blosc")
            blosc = run_job(shapes, large_n, folder, address, fresh_workers(), compression="blosc")
            log(f"  {blosc.seconds:.1f} s; the same job with compression: none")
            uncompressed = run_job(shapes, large_n, folder, address, fresh_workers(), compression="none")
            n_jacobian = shapes.e2e_jacobian_samples
            log(f"  {uncompressed.seconds:.1f} s; Jacobians of {n_jacobian} samples")
            jacobian = run_job(shapes, n_jacobian, folder, address, fresh_workers(), mode="jacobian")
            log(f"  {jacobian.seconds:.1f} s")
        log("  in-process kernels, pipeline, block steps and codecs, after the cluster closed")
        kernel_rates += [vjp_rate(), vjp_rate()]
        jacobian_rates.append(jacobian_rate())
        pipeline = in_process_pipeline_rate(shapes, large_n, folder / f"e2e-{large_n}.zarr")
        steps, codecs = block_costs(shapes, folder, shapes.reps)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return EndToEnd(
        cluster_start,
        small,
        large,
        kernel_rates,
        steps,
        pipeline,
        uncompressed,
        blosc,
        jacobian,
        jacobian_rates,
        codecs,
    )


@contextlib.contextmanager
def local_cluster(workers: int = 2) -> Iterator[Cluster]:
    """A LocalCluster of ``workers`` worker processes x 1 thread, with jacrun's local worker settings."""
    import logging

    from distributed import Client, LocalCluster

    from jacrun.cluster import local_worker_settings

    start = time.perf_counter()
    with (
        local_worker_settings(),  # the workers' settings, as jacrun's own local clusters
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit="8GiB",
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.run(warm_worker)

        def fresh_workers() -> list[int]:
            # new worker processes under new nannies: client.restart() can close a nanny for
            # good instead of restarting its worker (dask/distributed#7312), and then waits 120 s
            cluster.scale(0)
            while client.scheduler_info()["workers"]:
                time.sleep(0.05)
            cluster.scale(workers)
            client.wait_for_workers(workers, timeout=120)
            return list(client.run(warm_worker).values())

        yield cluster.scheduler_address, fresh_workers, time.perf_counter() - start


def measure(ctx: Context) -> EndToEnd:
    return measure_e2e(ctx.shapes, local_cluster, ctx.log)


def render(e2e: EndToEnd, ctx: Context) -> str:
    return e2e_table(e2e, ctx.shapes)


def targets(e2e: EndToEnd | None) -> list[Target]:
    """End to end against the in-process kernel, for each job."""
    if e2e is None:
        return []
    goal = "end to end >= 90% of the in-process kernel"
    return [
        Target(f"{goal} (vjp, zstd)", e2e.ratio, 0.9, "{:.0%}"),
        Target(f"{goal} (vjp, blosc)", e2e.ratio_of(e2e.blosc), 0.9, "{:.0%}"),
        Target(f"{goal} (vjp, no compression)", e2e.ratio_of(e2e.uncompressed), 0.9, "{:.0%}"),
        Target(f"{goal} (Jacobians, zstd)", e2e.ratio_of(e2e.jacobian), 0.9, "{:.0%}"),
    ]


def _spread(rates: Sequence[float]) -> str:
    """' (median of 3 measurements with no cluster running, ...: 48,083-52,912)', or ''."""
    if len(rates) < 2:
        return ""
    return (
        f" (median of {len(rates)} measurements with no cluster running, one before the jobs and "
        f"{len(rates) - 1} after: {min(rates):,.0f}-{max(rates):,.0f})"
    )


def cpu_line(job: Job) -> str:
    """How much of the machine's CPU the 8N job used, and who used it."""
    cores = os.cpu_count() or 1
    available = job.seconds * cores
    workers, here = job.cpu.get("workers", math.nan), job.cpu.get("this process", math.nan)
    return (
        f"CPU during the 8N job: the workers used {workers:.1f} s and this process (scheduler, "
        f"client, nannies, the memory sampler) {here:.1f} s, of {available:.1f} core-seconds "
        f"({job.seconds:.1f} s x {cores} cores): **{(workers + here) / available:.0%}** of the "
        "machine. Near 100%, the job is bound by CPU: its ratio to the in-process kernel is "
        "then about the kernel's share of all that CPU, and only less work around the kernel "
        "(inputs, encoding, writing, Dask) raises it."
    )


def e2e_table(e2e: EndToEnd, shapes: Shapes) -> str:
    lines = [
        f"MLP {'-'.join(map(str, shapes.e2e_sizes))} tanh, float32, vjp with 1 random cotangent per "
        "sample, random inputs, `save_outputs: true`, zstd; `jacrun.submit` on a LocalCluster of "
        f"2 worker processes x 1 thread (started once, {e2e.cluster_start:.1f} s, not counted; "
        "fresh worker processes for each job).",
        "",
        "| job | samples | blocks (rows each) | results | wall | samples/s | vs in-process kernel |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, job in (("N", e2e.small), ("8N", e2e.large)):
        rate = job.samples / job.seconds
        lines.append(
            f"| {name}{'' if job.ok else ' (FAILED)'} | {job.samples:,} | "
            f"{job.blocks} ({job.rows_per_block:,}) | "
            f"{job.result_bytes / 1e9:.2f} GB | {job.seconds:.1f} s | {rate:,.0f} | "
            f"{rate / e2e.kernel_rate:.0%} |"
        )
    lines += [
        "",
        f"In-process kernel (same function, block of {e2e.large.rows_per_block:,} rows, this "
        f"process's BLAS threads, no cluster running): {e2e.kernel_rate:,.0f} samples/s"
        f"{_spread(e2e.kernel_rates)}. "
        "End to end (8N): "
        f"{e2e.rate:,.0f} samples/s = **{e2e.ratio:.0%}** of it ({e2e.ratio_with_start:.0%} counting the "
        "cluster start).",
        "",
        cpu_line(e2e.large),
        "",
        f"In-process pipeline (the job's whole blocks one after the other, without Dask: "
        f"generate x and v, kernel, finiteness, write; this process's BLAS threads): "
        f"{e2e.pipeline_rate:,.0f} samples/s. End to end (8N) = **{e2e.rate / e2e.pipeline_rate:.0%}** "
        "of it: what distributing the same work over Dask workers gains or costs.",
    ]
    variants = [
        ("8N, `compression: blosc`", e2e.blosc, e2e.kernel_rate),
        ("8N, `compression: none`", e2e.uncompressed, e2e.kernel_rate),
        ("per-sample Jacobians (zstd)", e2e.jacobian, e2e.jacobian_kernel_rate),
    ]
    if any(job is not None for _, job, _ in variants):
        lines += [
            "",
            "The same comparison for other jobs: the 8N job with blosc (lz4, bitshuffle) and "
            "without compression, and "
            f"per-sample Jacobians (mode `jacobian`, {shapes.e2e_jacobian_samples:,} samples, "
            "every block's results in one zstd chunk), each against its own in-process kernel "
            "(for the Jacobians, the reverse sweep over the output basis on one block):",
            "",
            "| job | samples | blocks (rows each) | results | wall | samples/s | in-process kernel "
            "| vs in-process kernel |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, job, kernel_rate in variants:
            if job is None:
                continue
            rate = job.samples / job.seconds
            lines.append(
                f"| {name}{'' if job.ok else ' (FAILED)'} | {job.samples:,} | "
                f"{job.blocks} ({job.rows_per_block:,}) | {job.result_bytes / 1e9:.2f} GB | "
                f"{job.seconds:.1f} s | {rate:,.0f} | {kernel_rate:,.0f} | **{rate / kernel_rate:.0%}** |"
            )
    if e2e.steps:
        lines += [
            "",
            f"Where one block's time goes ({e2e.large.rows_per_block:,} rows, zstd; "
            "`jacrun.block.run_block` in this process with 1 BLAS thread, as on a worker):",
            "",
            *steps_table(e2e.steps),
        ]
    worker_steps = e2e.large.block_seconds
    if worker_steps and sum(worker_steps.values()) > 0:
        blocks = e2e.large.blocks
        lines += [
            "",
            f"The same split as the workers measured it during the 8N job (the job's "
            f"`throughput.block_seconds`, per block on average over its {blocks} blocks):",
            "",
            *steps_table({step: seconds / blocks for step, seconds in worker_steps.items()}),
        ]
    if e2e.codecs:
        raw = e2e.large.rows_per_block * (shapes.e2e_sizes[0] + shapes.e2e_sizes[-1]) * 4
        lines += [
            "",
            f"Writing one such block ({raw / 1e6:.0f} MB of results) by `output.compression`: the "
            "write step of `run_block` in this process with 1 BLAS thread:",
            "",
            "| compression | write | stored size |",
            "|---|---:|---:|",
        ]
        for name, (seconds, ratio) in e2e.codecs.items():
            lines.append(f"| {name} | {seconds * 1e3:,.1f} ms | {ratio:.1%} |")
    return "\n".join(lines)
