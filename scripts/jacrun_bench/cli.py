"""The benchmark's command line: run the sections in order and print (and write) the report."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Collection, Sequence
from pathlib import Path

from jacrun_bench import common, report
from jacrun_bench.common import FULL, QUICK, Context, Log, stderr_log
from jacrun_bench.frameworks import FRAMEWORKS, available
from jacrun_bench.sections import sections

USAGE = """\
Run the real benchmark as

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench.py --output bench.md

(those variables, when set, pin OpenBLAS to an older, slower kernel). Timings are medians over
rounds that run every contender once, in turn, after warm-up runs, so a busy machine slows all
of them alike. --quick runs small shapes in seconds (a smoke test, not a measurement)."""


def run(
    quick: bool = False,
    frameworks: Sequence[str] = FRAMEWORKS,
    reps: int | None = None,
    only: str | None = None,
    skip: Collection[str] = (),
    log: Log = stderr_log,
) -> str:
    """Run every section not in ``skip`` and return the report (markdown). ``only`` keeps the
    kernel rows whose name contains it (``"mlp vjp"``, ``"lorenz96"``)."""
    shapes = QUICK if quick else FULL
    # --quick times nothing worth a pause: its contenders run back to back
    common.PAUSE = 0.0 if quick else common.CONTENDER_PAUSE
    if reps is not None:
        shapes = dataclasses.replace(shapes, reps=reps)
    load = os.getloadavg()[0]
    ctx = Context(shapes, quick, available(frameworks), only, log)
    env = report.environment(ctx.frameworks)  # before any cluster starts
    blas_table, blas = report.blas_info()
    kernel = report.blas_kernel(blas)
    log(f"BLAS: {kernel}")
    body: list[str] = []
    targets = []
    for section in sections():
        if section.NAME in skip:
            ctx.results[section.NAME] = None
            body += [f"## {section.TITLE}", "", f"Skipped (--skip-{section.NAME}).", ""]
            continue
        log(f"{section.NAME}:")
        result = ctx.results[section.NAME] = section.measure(ctx)
        body += [f"## {section.TITLE}", "", section.render(result, ctx), ""]
        targets += section.targets(result)
    header = [
        f"# jacrun benchmark{' (--quick: smoke test, not a measurement)' if quick else ''}",
        "",
        f"BLAS in use: **{kernel}**",
        "",
        env,
        f"- load average (1 min) when the run started: {load:.2f}, when it ended: "
        f"{os.getloadavg()[0]:.2f} (other processes on the cores slow every contender, "
        "small GEMMs on 2 BLAS threads most)",
        "",
    ]
    tail = [
        "## Targets",
        "",
        report.targets_table(targets),
        "",
        "## BLAS (threadpoolctl.threadpool_info())",
        "",
        blas_table,
        "",
    ]
    return "\n".join([*header, *body, *tail])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark jacrun's kernels and its job runner, in one run, on the same data.",
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, seconds (a smoke test)")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help="comma-separated frameworks to compare (torch,jax,autograd), or 'none'",
    )
    parser.add_argument("--reps", type=int, help="timed rounds per row (default 7, --quick 3)")
    parser.add_argument("--only", help="kernel rows whose name contains this (e.g. 'mlp vjp')")
    for section in sections():
        parser.add_argument(f"--skip-{section.NAME}", action="store_true", help=section.HELP)
    args = parser.parse_args(argv)
    frameworks = (
        [] if args.frameworks == "none" else [f.strip() for f in args.frameworks.split(",") if f.strip()]
    )
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        parser.error(f"unknown frameworks: {', '.join(sorted(unknown))}")
    skip = {s.NAME for s in sections() if getattr(args, f"skip_{s.NAME.replace('-', '_')}")}
    text = run(args.quick, frameworks, args.reps, args.only, skip)
    print(text)
    if args.output:
        args.output.write_text(text)
