"""submit(): config -> plan -> store -> cluster -> pending blocks -> progress -> finalize.

Everything that can be refused is refused before a cluster starts: the config, the shapes,
the plan, and the output store (a foreign folder, another job's store). Markers, not
chunks, say which blocks are done, so rerunning the same job computes only the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from jacrun import lease, location, store
from jacrun.block import STEPS, BlockJob, BlockResult, flush_writes, hold, run_block
from jacrun.cluster import (
    blas_threads,
    check_launchable,
    connect,
    dashboard_line,
    dashboard_link,
    insecure_address_warning,
)
from jacrun.config import JobConfig, with_scheduler
from jacrun.errors import ConfigError, JobFailed, storage_refusal
from jacrun.location import Location
from jacrun.plan import fmt_bytes
from jacrun.prepare import PreparedJob, prepare
from jacrun.progress import BlockProgress
from jacrun.space import check_free_space

log = logging.getLogger("jacrun")
ATTR_UPDATE_SECONDS = 2.0


@dataclass
class Summary:
    """What a run did. ``status`` is ``complete`` only when every block of the job is done."""

    store: str
    status: str
    blocks_total: int
    blocks_done: int
    blocks_run: int
    seconds: float
    products_per_second: float
    samples_per_second: float
    dashboard: str | None = None
    failures: list[str] = field(default_factory=list)
    lost: int = 0
    """Blocks left unfinished because the connection to the scheduler was lost."""
    refused: str | None = None
    """Why the store refused a write (full, read-only, no permission): the run stopped there,
    its pending blocks cancelled (see :func:`jacrun.errors.storage_refusal`)."""
    block_seconds: dict[str, float] = field(default_factory=dict)
    """Worker seconds per block step (see ``jacrun.block.STEPS``), summed over this run's blocks."""

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def library_versions() -> dict[str, str]:
    """Versions recorded in the store; xarray's is read from its metadata (importing it, with
    pandas, costs about 0.3 s of every submit, and only ``jacrun.load`` needs it)."""
    from importlib.metadata import version

    import dask
    import distributed
    import numpy
    import zarr

    from jacrun._version import __version__

    return {
        "jacrun": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "zarr": zarr.__version__,
        "xarray": version("xarray"),
    }


def open_output(job: PreparedJob, overwrite: bool = False, *, write: bool = True) -> PreparedJob:
    """Create the store, or reopen it for resuming; refuse anything that would lose data.

    Returns the job, re-planned to the store's block shape when resuming with ``auto`` chunks.
    ``write=False`` refuses the same things and returns the same job, but reads only: it
    neither deletes (``overwrite``) nor creates a store (``jacrun validate``).
    """
    config = job.config
    path = config.output.store  # a Path, or a URL
    state = store.store_state(path)
    if state == "foreign":
        raise ConfigError(
            f"output.store: {path} exists and is not a jacrun store; choose another path "
            "(jacrun never deletes files it did not write, with or without --overwrite)"
        )
    if state == "jacrun":
        attrs = store.read_attrs(path)
        if overwrite:
            check_free_space(job, replacing=True)
            if write:
                store.remove_store(path)
        elif attrs.get("config_hash") != job.config_hash:
            raise ConfigError(
                f"output.store: {path} holds another job (config {attrs.get('config_hash', '?')[:12]}, "
                f"this one {job.config_hash[:12]}); pass --overwrite to replace it, or choose "
                "another output.store"
            )
        else:
            job = _match_store_chunks(_stored_colouring(job, path, attrs), path)
            check_free_space(job)
            return job
    else:
        check_creatable(path)
        check_free_space(job)
    if write:
        _create(job, path)
    return job


def check_creatable(path: Location) -> None:
    """Refuse a local store path that cannot be created: below a file, or in a folder this
    process may not write to. Reads only. (A URL's bucket is probed by ``store_state``.)"""
    folder = location.local_path(path)
    if folder is None:
        return
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"output.store: cannot create {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"output.store: cannot create {path}: {folder} is not writable")


def preflight(config: JobConfig, *, overwrite: bool = False, write: bool = True) -> PreparedJob:
    """Everything ``submit`` checks before a cluster starts: the config, its files and plan, the
    cluster's launcher, and the output store (created here when ``write``). With ``write=False``
    nothing is written: ``jacrun validate`` refuses exactly what ``submit`` would refuse."""
    job = prepare(config)
    try:
        check_launchable(config.cluster)
        location.register(config.output.store, config.output.storage_options)
        return open_output(job, overwrite or config.output.overwrite, write=write)
    except ConfigError as exc:
        raise ConfigError(config.locate(str(exc))) from None


def _stored_colouring(job: PreparedJob, path: Location, attrs: dict[str, Any]) -> PreparedJob:
    """A resumed sparse Jacobian job uses the store's colouring exactly; its pattern must be this
    job's (a pattern file's contents are not part of the config hash)."""
    stored = attrs.get("sparsity")
    if job.sparse is None and stored is None:
        return job
    if job.sparse is None or stored is None:
        kinds = ("sparse", "dense") if stored else ("dense", "sparse")
        raise ConfigError(
            f"output.store: {path} holds a {kinds[0]} Jacobian and this job's is {kinds[1]}; "
            "pass --overwrite to replace it, or set sparsity to match"
        )
    if stored.get("pattern_sha256") != job.sparse.digest:
        raise ConfigError(
            f"output.store: {path} holds a Jacobian with another sparsity pattern "
            f"({stored.get('nnz')} nonzeros, this job's {job.sparse.nnz}); pass --overwrite to "
            "replace it, or choose another output.store"
        )
    arrays = store.read_pattern(path)
    if stored.get("mode") == job.sparse.direction and np.array_equal(arrays["colours"], job.sparse.colours):
        return job
    colouring = replace(
        job.sparse,
        colours=arrays["colours"],
        direction=stored["mode"],
        colouring="stored",
        colouring_seconds=0.0,
    )
    return replace(prepare(job.config, job.function, sparse=colouring), config=job.config)


def _match_store_chunks(job: PreparedJob, path: Location) -> PreparedJob:
    """Resume with the store's block shape; explicit chunk sizes must agree with it."""
    chunks = store.store_chunks(path, job.plan)
    if chunks is None:
        raise ConfigError(f"output.store: {path} lacks its {job.plan.result_name} array; use --overwrite")
    current = (job.plan.samples_per_block, job.plan.vectors_per_block)
    if chunks == current:
        return job
    requested = job.config.chunks
    for key, want, have in (
        ("samples", requested.samples, chunks[0]),
        ("vectors", requested.vectors, chunks[1]),
    ):
        if want != "auto" and want != have:
            raise ConfigError(
                f"chunks.{key}: {want} does not match the existing store's chunking ({have}); "
                f"use {have} or auto to resume, or --overwrite to start again"
            )
    resized = job.config.model_copy(
        update={"chunks": job.config.chunks.model_copy(update={"samples": chunks[0], "vectors": chunks[1]})}
    )
    again = prepare(resized, job.function, sparse=job.sparse)
    return replace(again, config=job.config)


def _create(job: PreparedJob, path: Location) -> None:
    from jacrun._version import __version__

    fn = job.function
    attrs = {
        "version": __version__,
        "name": job.config.name,
        "mode": job.config.mode,
        "config": job.config.to_dict(),
        "config_hash": job.config_hash,
        "function": {
            "kind": job.config.function.kind,
            "n_in": fn.n_in,
            "n_out": fn.n_out,
            "dtype": str(fn.dtype),
            **fn.attributes(),
        },
        "plan": job.plan.to_dict(),
        **({"sparsity": job.sparse.summary()} if job.sparse is not None else {}),
        "status": "created",
        "blocks_total": job.plan.n_blocks,
        "blocks_done": 0,
        "runs": [],
        "libraries": library_versions(),
    }
    try:
        store.create_store(
            path,
            job.plan,
            attrs,
            dtype=job.config.output_dtype,
            compression=job.config.output.compression,
            sparse=job.sparse,
            reducer=job.reducer,
        )
    except OSError as exc:
        raise ConfigError(f"output.store: cannot create {path}: {exc.strerror or exc}") from None
    store.consolidate(path)


def submit(
    config: JobConfig,
    *,
    overwrite: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
    console: Console | None = None,
    performance_report: str | Path | None = None,
    check: bool = False,
) -> Summary:
    """Run a job to completion (or failure) and return what happened.

    ``scheduler`` replaces the config's cluster section (as ``--scheduler`` does). ``check``
    runs the gradient checks on a few rows of every block inside the job and records them in
    the store's attributes; a failed check fails its block.
    """
    console = console or Console()
    if scheduler:
        config = with_scheduler(config, scheduler)
    job = prepare(config)
    try:
        check_launchable(config.cluster)
    except ConfigError as exc:
        raise ConfigError(config.locate(str(exc))) from None
    location.register(config.output.store, config.output.storage_options)
    try:
        state = store.store_state(config.output.store)  # a URL: its bucket and endpoint are reachable
        if state in ("absent", "empty"):  # before the lease, which is the store's first file
            check_creatable(config.output.store)
            check_free_space(job)
    except ConfigError as exc:
        message = str(exc) if str(exc).startswith("output.store: ") else f"output.store: {exc}"
        raise ConfigError(config.locate(message)) from None
    if state == "foreign":  # refused below: write no lease into it
        held = contextlib.nullcontext(None)
    else:
        held = take_lease(config, console if progress else None)
    with held as run_lease:
        return _submit_holding(job, run_lease, overwrite, console, progress, performance_report, check)


def take_lease(config: JobConfig, console: Console | None) -> lease.Lease:
    """The store's lease for this run (ConfigError naming the holder of a live one)."""
    held = lease.Lease(config.output.store)
    try:
        warning = held.acquire()
    except ConfigError as exc:
        raise ConfigError(config.locate(str(exc))) from None
    except OSError as exc:  # the lease is the store's first object
        what = exc.strerror or location.problem(config.output.store, exc)
        raise ConfigError(
            config.locate(f"output.store: cannot create {config.output.store}: {what}")
        ) from None
    if warning and console is not None:
        console.print(f"[yellow]warning:[/] {warning}")
    elif warning:
        log.warning("%s", warning)
    return held


def _submit_holding(
    job: PreparedJob,
    run_lease: lease.Lease | None,
    overwrite: bool,
    console: Console,
    progress: bool,
    performance_report: str | Path | None,
    check: bool,
) -> Summary:
    """submit(), once the store's lease is held."""
    config = job.config
    try:
        job = open_output(job, overwrite or config.output.overwrite)
    except ConfigError as exc:
        raise ConfigError(config.locate(str(exc))) from None
    if run_lease is not None:
        run_lease.refresh()  # creating or replacing the store removed it
    run = Run(job, console, progress, check)
    if not run.pending:
        if progress:
            console.print(f"All {job.plan.n_blocks} blocks already done in {run.path}.")
        return run.finalize(dashboard=None)
    if progress:
        plan = job.plan
        console.print(
            f"[bold]{config.name}[/]: {config.mode} of {config.function.kind} "
            f"({plan.n_in} -> {plan.n_out}), {plan.samples} samples x {plan.vectors} vectors; "
            f"{len(run.pending)} of {plan.n_blocks} blocks to run "
            f"({plan.samples_per_block} x {plan.vectors_per_block} each)"
        )
    address = getattr(config.cluster, "address", None)
    warning = insecure_address_warning(address) if address else None
    if warning and progress:
        console.print(f"[yellow]warning:[/] {warning}")
    with connect(config.cluster, watcher=run) as client:
        dashboard = dashboard_link(config.cluster, client)
        if progress:
            console.print(dashboard_line(config.cluster, dashboard))
            if not client.scheduler_info().get("workers"):
                console.print(f"Waiting for workers to join the scheduler at {client.scheduler.address} ...")
        report = contextlib.ExitStack()
        if performance_report:
            from distributed import performance_report as dask_report

            # the report looks for the "current" client; as_current also sets dask's global
            # scheduler config for its duration, so it is entered only when a report is asked for
            report.enter_context(client.as_current())
            report.enter_context(dask_report(filename=str(performance_report)))
        try:
            with report:
                run.execute(client)
        except KeyboardInterrupt:  # record what was done, then let the caller say so
            run.interrupted = True
            run.finalize(dashboard)
            raise
        if run.gave_up:  # the cluster never gave it workers: record the run, end it in one line
            run.finalize(dashboard)
            raise JobFailed(config.locate(run.gave_up))
    return run.finalize(dashboard)


class Run:
    """One invocation of a job: the pending blocks, their results, and the run's record in the store."""

    def __init__(self, job: PreparedJob, console: Console, progress: bool, check: bool = False) -> None:
        self.job = job
        self.check = check
        self.plan = job.plan
        self.path = str(job.config.output.store)
        self.console = console
        self.progress = progress
        self.started = time.perf_counter()
        self.compute_started: float | None = None
        """When the blocks were submitted: throughput excludes cluster start-up."""
        done = store.read_markers(self.path)
        self.already = int(done.sum())
        grid = self.plan.grid
        self.pending = [(i, j) for i in range(grid[0]) for j in range(grid[1]) if not done[i, j]]
        self.results: list[BlockResult] = []
        self.failed: dict[tuple[int, int], str] = {}
        self.write_failures: dict[tuple[int, int], str] = {}
        """Blocks whose data the workers found not on disk after the fact (marker cleared)."""
        self.lost = 0
        self.refused: str | None = None
        """The first write the store refused: the run stops (see ``BlockResult.refused``)."""
        self.disconnected = False
        self.interrupted = False
        self.gave_up: str | None = None
        """Why the cluster ended the run (a batch cluster whose workers never arrived)."""
        self._client = None
        self._futures: dict = {}
        """The futures not yet collected (and the one that holds the block job)."""
        self._bar: BlockProgress | None = None
        self.attrs = store.read_attrs(self.path)
        self.previous_runs = [  # a run still "running" here was killed before it could say so
            {**r, "status": "interrupted"} if r.get("status") == "running" else r
            for r in self.attrs.get("runs", [])
        ]
        self.record: dict[str, Any] = {"started": store.now(), "status": "running", "blocks_computed": 0}
        self._save_progress()

    @property
    def failures(self) -> list[str]:
        return list(self.failed.values())

    def _save_progress(self, computed: int | None = None, **extra: Any) -> None:
        self.record["blocks_computed"] = len(self.results) if computed is None else computed
        self.record["blocks_failed"] = len(self.failed)
        try:
            store.update_attrs(self.path, runs=[*self.previous_runs, self.record], **extra)
        except OSError as exc:  # a full disk: the markers still say which blocks are done
            refused = storage_refusal(exc)
            if refused is None:
                raise
            self.refused = self.refused or refused

    def notice(self, text: str) -> None:
        """The cluster's state on the terminal (the batch queue, workers being replaced)."""
        if self._bar is not None:
            self._bar.note(text)
        elif self.progress:
            self.console.print(text, highlight=False, markup=False, emoji=False)

    def give_up(self, reason: str) -> None:
        """End the run: the cluster's workers never arrived. Called from the cluster's watch."""
        self.gave_up = reason
        if self._client is not None and self._futures:
            self._client.cancel(list(self._futures.copy()))

    def blocks_left(self) -> int:
        """Blocks of this run not yet finished or failed."""
        return len(self.pending) - len(self.results) - len(self.failed)

    def execute(self, client) -> None:
        """Submit one task per pending block; collect results and failures as they finish."""
        from distributed import as_completed

        config = self.job.config
        block_job = BlockJob(
            config,
            self.job.config_hash,
            self.plan,
            self.job.inputs,
            self.job.vectors,
            self.path,
            self.check,
            blas_threads(config.cluster),
            self.job.sparse,
            self.job.reducer,
        )
        prefix = f"jacrun-{config.name}-{self.job.config_hash[:10]}"
        # a task, not scattered data: the scheduler can compute it again if every worker that
        # held it leaves (batch jobs end), and it needs no worker to exist yet
        shared = client.submit(hold, block_job, pure=False)
        futures = {
            client.submit(run_block, shared, i, j, key=(prefix, i, j), retries=config.retries, pure=False): (
                i,
                j,
            )
            for i, j in self.pending
        }
        self._client, self._futures = client, {shared: None, **futures}
        if self.gave_up:
            client.cancel(list(self._futures.copy()))
        self._save_progress(status="running")
        self.compute_started = time.perf_counter()
        last_save = time.monotonic()
        total = self.plan.n_blocks
        with BlockProgress(self.console, total=total, done=self.already, enabled=self.progress) as bar:
            self._bar = bar
            try:
                for future in as_completed(futures, loop=client.loop):
                    # released once collected: a finished block's result must not stay on a
                    # worker, where a worker leaving (a batch job ending) would have it recomputed
                    self._collect(future, futures.pop(future), bar)
                    self._futures.pop(future, None)
                    if self.refused:  # no other block can be written either: stop here
                        client.cancel([f for f in futures if not f.done()])
                        break
                    if time.monotonic() - last_save > ATTR_UPDATE_SECONDS:
                        self._save_progress(blocks_done=self.already + len(self.results))
                        last_save = time.monotonic()
            except OSError:  # the scheduler went away while we waited (CommClosedError is one)
                self.disconnected = True
            finally:
                self._bar = None
        self.disconnected = self.disconnected or client.status != "running"
        if not self.disconnected and not self.gave_up:
            self._flush_writes(client)

    def _flush_writes(self, client) -> None:
        """Wait until every worker's chunk files of this job are on disk. A block whose data
        did not get there is unmarked (see jacrun.writeback) and reported failed."""
        try:
            reports = client.run(flush_writes, self.path, on_error="return")
        except Exception as exc:  # noqa: BLE001 - the scheduler went away: markers still tell the truth
            log.warning("could not check the workers' last writes: %s", exc)
            return
        for worker, errors in reports.items():
            if isinstance(errors, BaseException):
                log.warning("could not check the last writes of worker %s: %s", worker, errors)
                continue
            for marker, reason in errors:
                block = store.marker_block(marker) if marker else None
                if block is None:
                    log.warning("%s", reason)
                    continue
                try:  # again: the block may have written its marker after its data was found bad
                    store.unmark_block(self.path, block)
                    what = "its marker was cleared, so a rerun recomputes it"
                except Exception as exc:  # noqa: BLE001 - the store's disk is failing too
                    what = f"its marker could not be cleared ({exc}): delete {marker}, then rerun"
                a, b = self.plan.block_rows(block[0])
                self.write_failures[block] = f"block {block} samples {a}:{b}: {reason}; {what}"

    def _collect(self, future, block: tuple[int, int], bar: BlockProgress) -> None:
        """Record one finished task: a result, a failure naming the block, or nothing if lost."""
        i, j = block
        if future.status == "cancelled":  # the scheduler went away, or gave up on it
            return
        try:
            if future.status == "finished":
                result = future.result()
                if result.refused:
                    self.refused = self.refused or result.refused
                    return
                self.results.append(result)
                bar.advance(result.rows if j == 0 else 0, result.products)
                return
            error = future.exception()
        except (OSError, CancelledError):  # finished, but the scheduler is gone: recomputed next run
            return
        a, b = self.plan.block_rows(i)
        self.failed[i, j] = f"block ({i}, {j}) samples {a}:{b}: {type(error).__name__}: {error}"
        bar.fail(self.failed[i, j])

    def _checks_summary(self) -> dict[str, Any]:
        """``submit --check``: worst error per check over the checked blocks, and the verdict."""
        from jacrun.checks import TOLERANCES

        checked = [r.checks for r in self.results if r.checks]
        worst: dict[str, float] = {}
        for errors in checked:
            for name, error in errors.items():
                worst[name] = max(worst.get(name, 0.0), error)
        failed = [message for message in self.failed.values() if "CheckFailed" in message]
        return {
            "blocks_checked": len(checked) + len(failed),
            "passed": not failed,
            "worst": worst,
            "tolerances": TOLERANCES[str(self.job.function.dtype)],
            "failures": failed[:20],
        }

    def _reductions(self) -> dict[str, Any]:
        """Combine the blocks' partials (once: a complete store keeps its results) and summarise."""
        from jacrun.reduce import spectral_gap

        done = self.attrs.get("reductions")
        if done:
            return done
        results = store.finish_reductions(self.path, self.plan, self.job.reducer)
        summary: dict[str, Any] = {"names": list(self.job.reducer.names)}
        if "gram_eigenvalues" in results:
            values = results["gram_eigenvalues"]
            k, ratio = spectral_gap(values)
            summary["eigenvalues"] = [float(v) for v in values[:10]]
            summary["gap"] = {"after": k, "ratio": None if np.isnan(ratio) else ratio}
        return summary

    def finalize(self, dashboard: str | None) -> Summary:
        """Count markers (the truth); record the run, status, throughput and non-finite counts."""
        seconds = time.perf_counter() - self.started
        total = self.plan.n_blocks
        marks = store.read_markers(self.path)
        done = int(marks.sum())
        # markers are the truth: a task reported failed (say, its worker died after it wrote its
        # marker) whose block is done is no failure
        self.failed = {block: message for block, message in self.failed.items() if not marks[block]}
        self.failed.update(self.write_failures)  # kept even if the marker could not be cleared
        unfinished = [b for b in self.pending if not marks[b] and b not in self.failed]
        if self.interrupted or self.disconnected or self.refused or self.gave_up:
            self.lost = len(unfinished)

        else:
            for i, j in unfinished:
                a, b = self.plan.block_rows(i)
                self.failed[i, j] = f"block ({i}, {j}) samples {a}:{b}: did not finish (its result was lost)"
        if done == total and not self.failed:
            status = "complete"
        elif self.interrupted:
            status = "interrupted"
        else:
            status = "failed" if self.failed or self.lost else "incomplete"
        rows = sum(r.rows for r in self.results if r.j == 0)
        products = sum(r.products for r in self.results)
        nonfinite = dict(self.attrs.get("nonfinite") or {})
        for result in self.results:
            for name, count in result.nonfinite.items():
                nonfinite[name] = nonfinite.get(name, 0) + count
        computing = time.perf_counter() - (self.compute_started or self.started)
        block_seconds = {step: round(sum(r.steps.get(step, 0.0) for r in self.results), 6) for step in STEPS}
        throughput = {
            "products_per_second": products / computing if computing > 0 else 0.0,
            "samples_per_second": rows / computing if computing > 0 else 0.0,
            "compute_seconds": round(computing, 3),
            "block_seconds": block_seconds,
        }
        self.record.update(
            status=status,
            finished=store.now(),
            seconds=round(seconds, 3),
            failures=self.failures[:20],
            blocks_lost=self.lost,
            **({"refused": self.refused} if self.refused else {}),
        )
        extra = {"checks": self._checks_summary()} if self.check else {}
        if status == "complete" and self.job.reducer is not None:
            extra["reductions"] = self._reductions()
        self._save_progress(
            done - self.already,
            status=status,
            blocks_done=done,
            nonfinite=nonfinite,
            throughput=throughput,
            **extra,
        )
        return Summary(
            store=self.path,
            status=status,
            blocks_total=total,
            blocks_done=done,
            blocks_run=done - self.already,
            seconds=seconds,
            products_per_second=throughput["products_per_second"],
            samples_per_second=throughput["samples_per_second"],
            dashboard=dashboard,
            failures=self.failures,
            lost=self.lost,
            block_seconds=block_seconds,
            refused=self._refusal(done),
        )

    def _refusal(self, done: int) -> str | None:
        """The one line for a run the store stopped: why, what is kept, what to do."""
        if not self.refused:
            return None
        total = self.plan.n_blocks
        left = fmt_bytes(self.plan.output_bytes * (total - done) // total)
        return (
            f"{self.path}: {self.refused}; {done} of {total} blocks are done and kept. Free space "
            f"(the {total - done} blocks left write about {left} before compression), then rerun "
            "the same command"
        )
