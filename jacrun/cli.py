"""The ``jacrun`` command: thin Typer commands over the library.

Exit codes: 0 success, 1 job failure (or failed checks, or an incomplete store for
``status``), 2 bad input. User errors print one message, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jacrun.errors import ConfigError, JobFailed, Terminated

app = typer.Typer(
    name="jacrun",
    help="Distributed batch Jacobian products: VJPs, JVPs and per-sample Jacobians of "
    "f: R^n -> R^m for huge batches, run as resumable Dask jobs into Zarr stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

F = TypeVar("F", bound=Callable[..., Any])

ConfigArg = Annotated[Path, typer.Argument(help="The job's YAML config file.", show_default=False)]
StoreArg = Annotated[
    str, typer.Argument(help="A store written by `jacrun submit`: a path or URL.", show_default=False)
]
STORAGE_HELP = (
    "An fsspec option of a URL store, e.g. endpoint_url=http://host:9000 (dots nest: "
    "client_kwargs.region_name=eu-west-1)."
)
StorageOpt = Annotated[
    list[str] | None, typer.Option("--storage-option", "-o", metavar="KEY=VALUE", help=STORAGE_HELP)
]
StorageLongOpt = Annotated[  # for a command whose -o is --output
    list[str] | None, typer.Option("--storage-option", metavar="KEY=VALUE", help=STORAGE_HELP)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key, e.g. chunks.samples=4096."),
]


@app.callback()
def _terminal() -> None:
    """Before any command: library warnings stay off the terminal (see jacrun.terminal)."""
    from jacrun.terminal import install

    install(lambda text: err.print(f"[yellow]warning:[/] {escape(text)}"))


def user_errors(command: F) -> F:
    """Turn ConfigError into one message on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
        except JobFailed as exc:
            err.print(f"[red]job failed:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a batch system's or a user's ``kill``) ends the run as Ctrl-C does: finished
    blocks recorded, batch jobs cancelled."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _store(store_path: str, options: list[str] | None) -> str:
    """The store argument, its ``-o`` options registered for this process."""
    from jacrun import location
    from jacrun.config import nested_assignments

    parsed = nested_assignments(options or [], "--storage-option")
    if parsed and not location.is_url(store_path):
        raise ConfigError("--storage-option: only for a URL store (s3://bucket/job.zarr, ...)")
    if location.is_url(store_path):
        try:
            store_path = location.check_url(store_path)
        except ValueError as exc:
            raise ConfigError(f"{store_path.split('://')[0]}:// store: {exc}") from None
        location.register(store_path, parsed)
    return store_path


def _load(config: Path, overrides: list[str] | None, scheduler: str | None = None):
    from jacrun.config import load_config, with_scheduler

    cfg = load_config(config, overrides)
    return with_scheduler(cfg, scheduler) if scheduler else cfg


@app.command()
@user_errors
def submit(
    config: ConfigArg,
    overrides: SetOpt = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Run on this Dask scheduler (tcp://host:8786) instead of the config's cluster."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace an existing store written by jacrun (never other folders)."),
    ] = False,
    performance_report: Annotated[
        Path | None, typer.Option(help="Write Dask's HTML performance report here.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No plan, progress or summary.")] = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Gradient-check a few rows of every block; a failure fails the job."),
    ] = False,
) -> None:
    """Run a job: plan, start or join the cluster, compute the missing blocks, write the store.

    Rerunning the same command after an interruption computes only the blocks not yet done.
    """
    from jacrun.cluster import quiet_dask_logs
    from jacrun.runner import submit as run

    try:
        cfg = _load(config, overrides, scheduler)
        quiet_dask_logs()
        with _sigterm_interrupts():
            summary = run(
                cfg,
                overwrite=overwrite,
                progress=not quiet,
                console=out,
                performance_report=performance_report,
                check=check,
            )
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        err.print(f"{what}: finished blocks are kept; rerun the same command to resume")
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    if not quiet:
        _print_summary(summary)
    if summary.refused:
        err.print(f"[red]stopped:[/] {escape(summary.refused)}")
        raise typer.Exit(1)
    if not summary.ok:
        if summary.lost:
            err.print(
                f"[red]lost the connection to the scheduler[/]: {summary.lost} block(s) unfinished. "
                "Finished blocks are kept: start a scheduler and rerun the same command "
                "(with --scheduler ADDRESS for a new one) to resume."
            )
        if summary.failures:
            first = escape(summary.failures[0])
            err.print(f"[red]job failed:[/] {len(summary.failures)} block(s) failed; first: {first}")
        err.print("Finished blocks are kept: rerun the same command to compute the rest.")
        raise typer.Exit(1)


def _print_summary(summary) -> None:
    from jacrun.block import step_shares

    out.print(
        f"[bold]{summary.status}[/]: {summary.blocks_done}/{summary.blocks_total} blocks "
        f"({summary.blocks_run} this run) in {summary.seconds:.1f} s; while computing "
        f"{summary.samples_per_second:,.0f} samples/s, {summary.products_per_second:,.0f} products/s"
    )
    shares = step_shares(summary.block_seconds)
    if shares:
        out.print(f"time in blocks: {shares}")
    out.print(f"store: {summary.store}   open with: jacrun.load({summary.store!r})")


@app.command()
@user_errors
def validate(
    config: ConfigArg,
    overrides: SetOpt = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Validate as `submit --scheduler ADDRESS` would run.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Validate as `submit --overwrite` would run.")] = False,
) -> None:
    """Check a job as `submit` would, without starting a cluster or writing anything.

    The config, its files and shapes, its plan, the cluster's launcher and the output store (a
    new path, or this job's store to resume): everything `submit` refuses before it starts.
    """
    from jacrun.runner import preflight

    job = preflight(_load(config, overrides, scheduler), overwrite=overwrite, write=False)
    out.print(
        f"[green]ok[/]: {config} — {job.config.mode} of {job.config.function.kind} "
        f"({job.function.n_in} -> {job.function.n_out}), {job.plan.samples} samples, "
        f"{job.plan.n_blocks} blocks"
    )


@app.command()
@user_errors
def plan(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Print the block grid, projected memory and FLOPs per block, task count, output size and
    estimated runtime (a block's inputs, kernel and encoding timed here on at most a block's rows)."""
    from jacrun.prepare import prepare

    job = prepare(_load(config, overrides), estimate=True)
    out.print(plan_table(job))
    for warning in job.plan.warnings:
        err.print(f"[yellow]warning:[/] {warning}")


def sparse_summary(nnz: int, m: int, n: int, colours: int, direction: str, width: int) -> str:
    """'326,656 per sample (density 0.0076%); 5 colours (rev): 13107x fewer products'."""
    return (
        f"{nnz:,} per sample (density {100 * nnz / (m * n):.3g}%); {colours} colours ({direction}): "
        f"{width / colours:,.4g}x fewer products than dense"
    )


def plan_table(job) -> Table:
    from jacrun.cluster import blas_threads
    from jacrun.plan import fmt_bytes

    p = job.plan
    cluster = job.config.cluster
    threads = getattr(cluster, "threads_per_worker", 1)
    estimate = "unknown" if p.estimated_seconds is None else f"{p.estimated_seconds:.1f} s of blocks"
    table = Table(title=f"plan: {job.config.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    flops = "unknown" if p.flops_per_block != p.flops_per_block else f"{p.flops_per_block / 1e9:.3g} GFLOP"
    rows = [
        ("mode", p.mode + (f" ({p.strategy})" if p.strategy else "")),
        (
            "function",
            f"{job.config.function.kind}: {p.n_in} -> {p.n_out}, {job.config.compute_dtype}",
        ),
        ("samples x vectors", f"{p.samples} x {p.vectors}"),
        ("result", f"{p.result_name} {p.result_shape} dims {p.result_dims}"),
        ("block", f"{p.samples_per_block} samples x {p.vectors_per_block} vectors"),
        ("grid", f"{p.grid[0]} x {p.grid[1]} = {p.n_blocks} tasks"),
        (
            "memory per block",
            f"{fmt_bytes(p.memory_per_block)} (budget {fmt_bytes(p.task_memory)})",
        ),
        ("FLOPs per block", flops),
        ("output size", f"{fmt_bytes(p.output_bytes)} uncompressed"),
        *(
            [
                (
                    "reductions",
                    f"{', '.join(p.reductions)}; partial sums {fmt_bytes(p.partial_bytes)} until the end",
                )
            ]
            if p.reductions
            else []
        ),
        (
            "estimated runtime",
            f"{estimate} on {p.workers} worker(s)"
            + (
                ""
                if p.seconds_per_block is None
                else f" ({p.seconds_per_block:.2f} s per block: inputs, kernel, encoding; not the disk)"
            ),
        ),
        ("threads", f"{threads} per worker x {blas_threads(cluster)} BLAS thread(s) each"),
        ("store", str(job.config.output.store)),
    ]
    summary = job.function.attributes().get("summary")
    if summary:
        rows.insert(2, ("kernels", summary))
    if p.sparsity:
        rows.insert(1, ("sparsity", p.sparsity))
    if p.nnz is not None:
        width = p.n_in if p.strategy == "fwd" else p.n_out
        rows.insert(2, ("nonzeros", sparse_summary(p.nnz, p.n_out, p.n_in, p.vectors, p.strategy, width)))
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command()
@user_errors
def status(store_path: StoreArg, storage_options: StorageOpt = None) -> None:
    """Blocks done of a store's job. Exit 0 when complete, 1 when not."""
    from jacrun import store

    store_path = _store(store_path, storage_options)
    attrs = store.read_attrs(store_path)
    marks = store.read_markers(store_path)
    done, total = int(marks.sum()), marks.size
    recorded = attrs.get("status", "unknown")
    if done == total:
        state = "complete"
    elif recorded == "running":
        state = "running (or interrupted: rerun `jacrun submit` to resume)"
    else:
        state = f"{recorded if recorded != 'complete' else 'incomplete'}: rerun `jacrun submit` to finish"
    out.print(f"{store_path}: {state}, {done}/{total} blocks ({100 * done / max(total, 1):.1f}%)")
    if done != total:
        raise typer.Exit(1)


@app.command()
@user_errors
def show(store_path: StoreArg, storage_options: StorageOpt = None) -> None:
    """Summarize a store: job, function, arrays, runs and throughput."""
    from jacrun import store
    from jacrun.block import step_shares

    store_path = _store(store_path, storage_options)
    attrs = store.read_attrs(store_path)
    marks = store.read_markers(store_path)
    fn = attrs.get("function", {})
    table = Table(title=f"{store_path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", f"{attrs.get('name')} ({attrs.get('mode')})")
    table.add_row("function", f"{fn.get('kind')}: {fn.get('n_in')} -> {fn.get('n_out')}, {fn.get('dtype')}")
    if fn.get("summary"):
        table.add_row("kernels", fn["summary"])
    table.add_row("status", f"{attrs.get('status')}, {int(marks.sum())}/{marks.size} blocks")
    table.add_row("config hash", str(attrs.get("config_hash", ""))[:16])
    sparse = attrs.get("sparsity")
    if sparse:
        m, n = sparse["shape"]
        width = n if sparse["mode"] == "fwd" else m
        summary = sparse_summary(sparse["nnz"], m, n, sparse["colours"], sparse["mode"], width)
        table.add_row("sparse Jacobian", f"CSR ({m} x {n}), {summary}")
    for name, info in store.describe_arrays(store_path).items():
        table.add_row(f"array {name}", info)
    for n, run in enumerate(attrs.get("runs", []), 1):
        table.add_row(
            f"run {n}",
            f"{run.get('started')}: {run.get('blocks_computed')} blocks, "
            f"{run.get('blocks_failed', 0)} failed, {run.get('seconds', '?')} s",
        )
    throughput = attrs.get("throughput") or {}
    if throughput:
        table.add_row(
            "throughput",
            f"{throughput.get('samples_per_second', 0):,.0f} samples/s, "
            f"{throughput.get('products_per_second', 0):,.0f} products/s (last run)",
        )
        shares = step_shares(throughput.get("block_seconds") or {})
        if shares:
            table.add_row("time in blocks", f"{shares} (last run)")
    if any(attrs.get("nonfinite", {}).values()):
        counts = ", ".join(f"{name}: {count}" for name, count in attrs["nonfinite"].items())
        table.add_row("non-finite values", counts)
    reductions = attrs.get("reductions")
    if reductions:
        table.add_row("reductions", ", ".join(reductions.get("names", [])))
        values = reductions.get("eigenvalues")
        if values:
            table.add_row("gram eigenvalues", ", ".join(f"{v:.4g}" for v in values[:6]))
            gap = reductions.get("gap") or {}
            if gap.get("ratio"):
                after = gap["after"]
                table.add_row(
                    "largest gap",
                    f"after eigenvalue {after}: lambda_{after} / lambda_{after + 1} = {gap['ratio']:.3g}",
                )
    checks = attrs.get("checks")
    if checks:
        worst = ", ".join(f"{name} {error:.2g}" for name, error in checks.get("worst", {}).items())
        verdict = "passed" if checks.get("passed") else "FAILED"
        table.add_row("checks", f"{verdict} on {checks.get('blocks_checked')} blocks; worst: {worst}")
    out.print(table)


@app.command()
@user_errors
def plot(
    store_path: StoreArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="The PNG to write (default: STORE with .png; a URL store's name, here)."
        ),
    ] = None,
    storage_options: StorageLongOpt = None,
) -> None:
    """Draw a store as a PNG: Gram eigenvalues (gap marked) and eigenvectors, a histogram of
    norms, the mean and spread of per-sample products. Needs matplotlib (jacrun[plot])."""
    from jacrun.plot import plot_store

    path = plot_store(_store(store_path, storage_options), output)
    out.print(f"wrote {path}")


@app.command()
@user_errors
def verify(
    store_path: StoreArg,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Clear the damaged blocks' markers: the next submit recomputes them."),
    ] = False,
    scheduler: Annotated[
        str | None, typer.Option(help="Read the chunks on this Dask scheduler's workers instead of here.")
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Reading threads (without --scheduler).")] = 8,
    storage_options: StorageOpt = None,
) -> None:
    """Read every chunk of every finished block: checksums, and every marked block has its chunks.

    Exit 0 when the store is intact, 1 when damage is found (also with --repair: rerun
    `jacrun submit` to recompute the repaired blocks).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from jacrun import verify as checker

    store_path = _store(store_path, storage_options)
    if scheduler:
        from pydantic import ValidationError

        from jacrun.cluster import connect
        from jacrun.config import AddressClusterConfig

        try:
            client_context = connect(AddressClusterConfig(kind="address", address=scheduler))
        except ValidationError:
            raise ConfigError(
                f"--scheduler: {scheduler!r} is not a scheduler address (tcp://host:port)"
            ) from None
    else:
        client_context = contextlib.nullcontext()
    columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with client_context as client, Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("blocks", total=None)
        report = checker.verify_store(
            store_path, threads=threads, client=client, advance=lambda n: bar.advance(task, n)
        )
    for block, problems in report.damaged.items():
        out.print(f"damaged {escape(report.block_label(block))}: {escape('; '.join(problems))}")
    for problem in report.store_damage:
        out.print(f"damaged store array: {escape(problem)} (no rerun repairs this: --overwrite and rerun)")
    if not report.checksummed:
        err.print(
            "[yellow]warning:[/] this store's chunks carry no checksums (written before jacrun checked them)"
        )
    summary = (
        f"{store_path}: {report.blocks_marked}/{report.blocks_total} blocks done, "
        f"{report.chunks_checked} chunks read"
    )
    if report.intact:
        out.print(f"[green]intact[/]: {summary}")
        return
    out.print(f"[red]damaged[/]: {summary}, {len(report.damaged)} damaged block(s)")
    if repair and report.damaged:
        checker.repair(store_path, list(report.damaged))
        out.print(
            f"repaired: cleared the markers of {len(report.damaged)} block(s); rerun `jacrun submit` "
            "with the job's config to recompute exactly them"
        )
    raise typer.Exit(1)


@app.command()
@user_errors
def check(
    config: ConfigArg,
    overrides: SetOpt = None,
    samples: Annotated[int, typer.Option(min=2, help="Input rows to check (the first ones).")] = 8,
    vectors: Annotated[int, typer.Option(min=1, help="Random vectors per sample.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the random vectors and tangents.")] = 0,
) -> None:
    """Gradient checks of the job's function: finite differences, dot-product, basis, row independence.

    Runs on the first --samples input rows, in process (no cluster, no store). Exit 0 when
    every check passes, 1 when any fails.
    """
    from jacrun.api import check_job

    reports = check_job(_load(config, overrides), samples=samples, vectors=vectors, seed=seed)
    for report in reports:
        out.print(report.table())
    failed = [
        f"{report.label}: {row.name} error {row.error:.3g} > tolerance {row.tolerance:.3g}"
        for report in reports
        for row in report.rows
        if not row.passed
    ]
    if failed:
        err.print("[red]checks failed:[/] " + "; ".join(escape(line) for line in failed))
        raise typer.Exit(1)
    out.print("[green]all checks passed[/]")


@app.command()
def functions() -> None:
    """List the built-in functions and their parameters."""
    from jacrun.functions import kinds

    for kind, cls in kinds().items():
        table = Table(title=f"[bold]{kind}[/]: {escape(cls.description)}", title_justify="left", box=None)
        table.add_column("parameter", style="bold")
        table.add_column("type")
        table.add_column("default")
        table.add_column("meaning")
        for name, info in cls.spec_model.model_fields.items():
            if name == "kind":
                continue
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            cells = (name, _type_name(info.annotation), default, info.description or "")
            table.add_row(*(escape(cell) for cell in cells))
        out.print(table)
        out.print()


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return (
        text.replace("typing.", "").replace("pathlib.", "").replace("Annotated[Path, AfterValidator", "Path[")
    )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted: finished blocks are kept; rerun the same command to resume")
        sys.exit(130)
