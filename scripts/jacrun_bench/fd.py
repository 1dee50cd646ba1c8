"""Section ``fd``: finite-difference Jacobians of black-box NumPy functions against SciPy.

In process, float64, the same samples for every contender:

- jacrun: ``SparseJacobian.evaluate`` of an ``autodiff: fd`` function (forward differences,
  the column colouring of the pattern f declares, f called on cache-sized batches of perturbed
  rows), on every core (kernel threads) and on one;
- SciPy: ``approx_derivative`` (``method="2-point"``, ``sparsity=(pattern, group_columns(pattern))``,
  its own greedy column groups), looped over the samples, one at a time as SciPy is used;

on the 9-point stencil residual of ``examples/fd_fn`` (n = 1,024, 4,096, 16,384) and a banded
chain (n = 4,096). Every row checks jacrun's Jacobian of sample 0 against SciPy's (the same
steps: the same numbers). Then each method's error against the exact Jacobian and its speed;
the size of f's calls (``fd.call_memory``); and one job of 10,000 samples through
``jacrun.submit`` on a 2-worker local cluster, cluster start included, against SciPy's loop.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from jacrun_bench.common import Context, Target, rounds

NAME = "fd"
TITLE = "Finite differences (autodiff: fd, float64)"
HELP = "skip the finite-difference Jacobians (against SciPy's approx_derivative, and their job)"
MIN_SECONDS = 0.25
"""Each contender runs for at least this long per round."""
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fd_fn"
LAM = 1.0
METHODS = ("forward", "central", "complex")


def stencil_spec(grid: int, method: str = "forward", call_memory: int | None = None) -> dict[str, Any]:
    fd: dict[str, Any] = {"method": method}
    if call_memory is not None:
        fd["call_memory"] = call_memory
    return {
        "kind": "python",
        "autodiff": "fd",
        "target": "stencil9:residual",
        "path": str(EXAMPLE),
        "batched": True,
        "params": {"grid": grid, "lam": LAM},
        "fd": fd,
    }


def banded_chain(n: int = 4096) -> Callable[[np.ndarray], np.ndarray]:
    """A batched f with a 4-band Jacobian (columns i-2 .. i+1 of row i):
    sin(x_i) x_{i+1} + x_{i-1}^2 + exp(x_i / 2) + cos(x_{i-2})."""

    def f(x: np.ndarray) -> np.ndarray:
        b = x.shape[0]
        pad = np.zeros((b, n + 3), dtype=x.dtype)
        pad[:, 2:-1] = x
        left2, left1, right1 = pad[:, :-3], pad[:, 1:-2], pad[:, 3:]
        return np.sin(x) * right1 + left1**2 + np.exp(0.5 * x) + np.cos(left2)

    f.n_in = n  # type: ignore[attr-defined]
    f.sparsity = lambda: chain_pattern(n)  # type: ignore[attr-defined]
    return f


def chain_pattern(n: int) -> sp.csr_array:
    return sp.csr_array(
        sp.diags_array([np.ones(n - abs(k)) for k in (-2, -1, 0, 1)], offsets=[-2, -1, 0, 1]) != 0
    )


def chain_jacobian(x: np.ndarray) -> sp.csr_array:
    """The exact Jacobian of :func:`banded_chain` at one sample x (n,)."""
    n = x.size
    right = np.append(x[1:], 0.0)
    main = np.cos(x) * right + 0.5 * np.exp(0.5 * x)
    upper = np.sin(x[:-1])  # d/dx_{i+1}
    lower1 = 2 * x[:-1]  # row i, column i-1
    lower2 = -np.sin(x[:-2])  # row i, column i-2, cos(x_{i-2}) (zero padding: cos(0) is constant)
    return sp.csr_array(sp.diags_array([lower2, lower1, main, upper], offsets=[-2, -1, 0, 1], shape=(n, n)))


def stencil_jacobian(grid: int, u: np.ndarray) -> sp.csr_array:
    """The exact Jacobian of the 9-point residual at one sample u (grid^2,)."""
    shift = sp.diags_array([np.ones(grid - 1), np.ones(grid - 1)], offsets=[-1, 1])
    eye = sp.eye_array(grid)
    edges = sp.kron(eye, shift) + sp.kron(shift, eye)
    corners = sp.kron(shift, shift)
    h2 = 1.0 / (grid + 1) ** 2
    stencil = (20 * sp.eye_array(grid * grid) - 4 * edges - corners) / 6
    return sp.csr_array(stencil - sp.diags_array(LAM * h2 * np.exp(u)))


# ---- in process -----------------------------------------------------------------------------------


@dataclass
class FdRow:
    name: str
    n: int
    nnz: int
    colours: int
    groups: int
    """SciPy's group_columns count."""
    rates: dict[str, float]
    """Jacobians per second of each contender."""
    agreement: float
    """max |jacrun - scipy| / max |scipy| on sample 0."""


def bench_row(
    name: str, spec: dict[str, Any], samples: int, timing: dict[str, Any], log: Callable[[str], None]
) -> FdRow:
    """jacrun (every core, one core) against SciPy's loop on ``samples`` inputs."""
    from scipy.optimize._numdiff import approx_derivative, group_columns

    from jacrun.functions import build_function
    from jacrun.functions.parallel import blas_limit
    from jacrun.sources import random_rows
    from jacrun.sparsity import as_pattern, choose

    f = build_function(spec)
    n = f.n_in
    pattern = as_pattern(f.sparsity(), (f.n_out, n))
    sparse = choose(pattern, "fwd", "declared")
    groups = group_columns(pattern)
    x = random_rows("uniform", 1, 1, 0, samples, n)
    out = np.empty((samples, sparse.nnz))
    one = lambda u: f.forward_batch(u[None])[0]  # noqa: E731
    count = min(samples, 16)

    def scipy_loop() -> None:
        for i in range(count):
            approx_derivative(one, x[i], method="2-point", sparsity=(pattern, groups))

    def one_core() -> None:
        with blas_limit(1):
            sparse.evaluate(f, x, out=out, outputs=False)

    contenders = {
        "jacrun": lambda: sparse.evaluate(f, x, out=out, outputs=False),
        "jacrun 1 core": one_core,
        "scipy": scipy_loop,
    }
    counts = {"jacrun": samples, "jacrun 1 core": samples, "scipy": count}
    seconds = rounds(contenders, **timing)
    rates = {key: counts[key] / seconds[key] for key in contenders}
    for key, rate in rates.items():
        log(f"  {name}: {key} {rate:,.0f} Jacobians/s")
    ours = sparse.csr(sparse.evaluate(f, x[:1])[1][0])
    theirs = sp.csr_array(approx_derivative(one, x[0], method="2-point", sparsity=(pattern, groups)))
    agreement = float(abs(ours - theirs).max() / abs(theirs).max())
    return FdRow(name, n, sparse.nnz, sparse.n_colours, int(groups.max()) + 1, rates, agreement)


@dataclass
class MethodRow:
    function: str
    method: str
    rate: float
    error: float
    """max over the samples of max |J - J_exact| / max |J_exact|."""


def bench_methods(grid: int, chain_n: int, samples: int, timing: dict[str, Any]) -> list[MethodRow]:
    """Each method's Jacobians/s (jacrun, every core) and error against the exact Jacobian."""
    from jacrun.functions import build_function
    from jacrun.sources import random_rows
    from jacrun.sparsity import as_pattern, choose

    rows = []
    cases = {
        f"9-point stencil, n = {grid * grid:,}": (
            lambda method: stencil_spec(grid, method),
            lambda u: stencil_jacobian(grid, u),
        ),
        f"banded chain, n = {chain_n:,}": (
            lambda method: chain_spec(chain_n, method),
            chain_jacobian,
        ),
    }
    for label, (spec_of, exact_of) in cases.items():
        for method in METHODS:
            f = build_function(spec_of(method))
            sparse = choose(as_pattern(f.sparsity(), (f.n_out, f.n_in)), "fwd", "declared")
            x = random_rows("uniform", 1, 1, 0, samples, f.n_in) * 2
            out = np.empty((samples, sparse.nnz))
            run = {"jacrun": lambda f=f, sparse=sparse, x=x, out=out: sparse.evaluate(f, x, out=out)}
            seconds = rounds(run, **timing)["jacrun"]
            errors = []
            for i in range(samples):
                exact = exact_of(x[i])
                errors.append(abs(sparse.csr(out[i]) - exact).max() / abs(exact).max())
            rows.append(MethodRow(label, method, samples / seconds, float(max(errors))))
    return rows


def chain_spec(n: int, method: str = "forward") -> dict[str, Any]:
    return {
        "kind": "python",
        "autodiff": "fd",
        "target": "jacrun_bench.fd:banded_chain",
        "batched": True,
        "params": {"n": n},
        "fd": {"method": method},
    }


CALL_SIZES = {
    "256 KiB": 256 << 10,
    "512 KiB": 512 << 10,
    "1 MiB (default)": 1 << 20,
    "4 MiB": 4 << 20,
    "32 MiB": 32 << 20,
}


def bench_call_memory(
    grids: tuple[int, ...], samples: int, sizes: dict[str, int], timing: dict[str, Any]
) -> dict[int, dict[str, float]]:
    """Per grid, Jacobians/s on one core with f's calls of each size (``fd.call_memory``), in
    blocks of 64 samples."""
    from jacrun.functions import build_function
    from jacrun.functions.parallel import blas_limit
    from jacrun.sources import random_rows
    from jacrun.sparsity import as_pattern, choose

    rates = {}
    for grid in grids:
        contenders = {}
        x = random_rows("uniform", 1, 1, 0, samples, grid * grid)
        for label, size in sizes.items():
            f = build_function(stencil_spec(grid, call_memory=size))
            sparse = choose(as_pattern(f.sparsity(), (f.n_out, f.n_in)), "fwd", "declared")
            out = np.empty((samples, sparse.nnz))

            def run(f=f, sparse=sparse, out=out, x=x) -> None:
                with blas_limit(1):
                    for start in range(0, samples, 64):
                        sparse.evaluate(f, x[start : start + 64], out=out[start : start + 64], outputs=False)

            contenders[label] = run
        seconds = rounds(contenders, **timing)
        rates[grid] = {label: samples / seconds[label] for label in contenders}
    return rates


# ---- the job --------------------------------------------------------------------------------------


@dataclass
class FdJob:
    grid: int
    samples: int
    blocks: int
    seconds: float
    """jacrun.submit's wall time, the local cluster's start included."""
    ok: bool
    store_bytes: int
    max_error: float
    scipy_seconds: float
    """SciPy's loop over all the samples: its seconds per Jacobian on the job's first inputs,
    timed right before and right after the job (the mean), times the samples."""
    scipy_timed: int
    """Samples SciPy's loop was timed on, before and after the job each."""
    steps: dict[str, float] = field(default_factory=dict)


def scipy_loop_seconds(grid: int, x: np.ndarray) -> float:
    """Seconds of ``approx_derivative`` (2-point, sparsity with ``group_columns``) looped over x."""
    from scipy.optimize._numdiff import approx_derivative, group_columns

    from jacrun.functions import build_function
    from jacrun.sparsity import as_pattern

    f = build_function(stencil_spec(grid))
    pattern = as_pattern(f.sparsity(), (f.n_out, f.n_in))
    groups = group_columns(pattern)
    one = lambda u: f.forward_batch(u[None])[0]  # noqa: E731
    start = time.perf_counter()
    for row in x:
        approx_derivative(one, row, method="2-point", sparsity=(pattern, groups))
    return time.perf_counter() - start


def bench_job(grid: int, samples: int, timed: int, folder: Path, log: Callable[[str], None]) -> FdJob:
    """``jacrun.submit`` of the sparse forward-difference job on a 2-worker local cluster that
    jacrun starts itself (timed from the call: cluster start, blocks, writing, shutdown), and
    SciPy's loop on ``timed`` of its inputs right before and right after it (the machine is
    shared: both see the same load)."""
    import zarr

    import jacrun
    from jacrun.functions import build_function
    from jacrun.sources import RandomRows
    from jacrun.sparsity import as_pattern, choose

    store = folder / "fd.zarr"
    settings = {
        "name": f"bench-fd-{grid}",
        "mode": "jacobian",
        "function": stencil_spec(grid),
        "inputs": {"kind": "random", "samples": samples, "distribution": "uniform", "seed": 1},
        "output": {"store": str(store), "save_outputs": False, "dtype": "float32"},
        "cluster": {
            "kind": "local",
            "workers": 2,
            "threads_per_worker": 1,
            "memory_limit": "4GiB",
            "dashboard": None,
        },
    }
    config = jacrun.config_from_dict(settings)
    first = RandomRows(samples, grid * grid, "uniform", 1).read(0, timed, np.dtype("float64"))
    before = scipy_loop_seconds(grid, first)
    start = time.perf_counter()
    summary = jacrun.submit(config, progress=False)
    seconds = time.perf_counter() - start
    after = scipy_loop_seconds(grid, first)
    scipy_seconds = (before + after) / 2 / timed * samples
    attrs = jacrun.store.read_attrs(store)
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    f = build_function(stencil_spec(grid))
    sparse = choose(as_pattern(f.sparsity(), (f.n_out, f.n_in)), "fwd", "declared")
    rows = np.linspace(0, samples - 1, 8).astype(int)
    stored = zarr.open_group(str(store), mode="r")["jacobian"].get_orthogonal_selection((rows, slice(None)))
    inputs = RandomRows(samples, f.n_in, "uniform", 1)
    x = np.concatenate([inputs.read(int(r), int(r) + 1, f.dtype) for r in rows])
    expected = sparse.evaluate(f, x)[1]
    error = float(np.max(np.abs(stored - expected)) / np.max(np.abs(expected)))
    log(f"  job: {samples} samples in {seconds:.1f} s (cluster start included); SciPy {scipy_seconds:.1f} s")
    steps = (attrs.get("throughput") or {}).get("block_seconds") or {}
    blocks = attrs["plan"]["n_blocks"]
    return FdJob(grid, samples, blocks, seconds, summary.ok, store_bytes, error, scipy_seconds, timed, steps)


# ---- the section ----------------------------------------------------------------------------------


@dataclass
class FdResult:
    rows: list[FdRow]
    methods: list[MethodRow]
    call_memory: dict[int, dict[str, float]]
    """grid -> call size -> Jacobians/s."""
    job: FdJob | None
    reps: int
    quick: bool


def measure(ctx: Context) -> FdResult:
    """The full run measures; ``--quick`` runs each part once on small shapes, without the job."""
    reps, warmup, seconds = (1, 0, 0.0) if ctx.quick else (ctx.shapes.reps, 1, MIN_SECONDS)
    timing = {"reps": reps, "warmup": warmup, "min_seconds": seconds}
    grids = (8,) if ctx.quick else (32, 64, 128)
    chain_n = 64 if ctx.quick else 4096
    rows = []
    for grid in grids:
        samples = 8 if ctx.quick else max(8, min(256, 2**20 // grid**2))
        rows.append(bench_row(f"9-point stencil L={grid}", stencil_spec(grid), samples, timing, ctx.log))
    rows.append(bench_row("banded chain", chain_spec(chain_n), 8 if ctx.quick else 256, timing, ctx.log))
    method_grid = 8 if ctx.quick else 64
    methods = bench_methods(method_grid, chain_n, 4 if ctx.quick else 32, timing)
    for row in methods:
        ctx.log(f"  {row.function} {row.method}: {row.rate:,.0f} Jacobians/s, error {row.error:.1e}")
    sizes = CALL_SIZES if not ctx.quick else dict(list(CALL_SIZES.items())[:2])
    call_memory = bench_call_memory((8,) if ctx.quick else (32, 64), 16 if ctx.quick else 256, sizes, timing)
    job = None
    if not ctx.quick:
        with tempfile.TemporaryDirectory() as folder:
            job = bench_job(64, 10_000, 200, Path(folder), ctx.log)
    return FdResult(rows, methods, call_memory, job, ctx.shapes.reps if not ctx.quick else 1, ctx.quick)


def _ratio(row: FdRow, ours: str) -> float:
    return row.rates[ours] / row.rates["scipy"]


def table(rows: list[FdRow]) -> str:
    lines = [
        "| function | n | nonzeros | colours (jacrun / SciPy groups) | jacrun J/s | jacrun 1 core J/s "
        "| SciPy J/s | jacrun / SciPy | 1 core / SciPy | agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.n:,} | {row.nnz:,} | {row.colours} / {row.groups} | "
            f"{row.rates['jacrun']:,.0f} | {row.rates['jacrun 1 core']:,.0f} | {row.rates['scipy']:,.0f} | "
            f"**{_ratio(row, 'jacrun'):.1f}x** | {_ratio(row, 'jacrun 1 core'):.1f}x | {row.agreement:.1e} |"
        )
    return "\n".join(lines)


def methods_table(rows: list[MethodRow]) -> str:
    lines = ["| function | method | Jacobians/s | max relative error |", "|---|---|---|---|"]
    lines += [f"| {r.function} | {r.method} | {r.rate:,.0f} | {r.error:.1e} |" for r in rows]
    return "\n".join(lines)


def job_table(job: FdJob) -> str:
    return "\n".join(
        [
            "| samples | blocks | seconds | Jacobians/s | store | SciPy loop | jacrun / SciPy | values |",
            "|---|---|---|---|---|---|---|---|",
            f"| {job.samples:,} | {job.blocks} | {job.seconds:.1f} | {job.samples / job.seconds:,.0f} | "
            f"{job.store_bytes / 2**20:,.0f} MiB | {job.scipy_seconds:.1f} s | "
            f"**{job.scipy_seconds / job.seconds:.1f}x** | "
            f"within {job.max_error:.1e} of the kernel (float32) |",
        ]
    )


def calls_table(rates: dict[int, dict[str, float]]) -> str:
    sizes = list(next(iter(rates.values())))
    lines = ["| n | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    for grid, row in rates.items():
        lines.append(f"| {grid * grid:,} | " + " | ".join(f"{row[size]:,.0f}" for size in sizes) + " |")
    return "\n".join(lines)


def render(result: FdResult, ctx: Context) -> str:
    lines = [
        f"Jacobians per second in process, medians of {result.reps} round(s) of at least "
        f"{0 if result.quick else MIN_SECONDS} s each, float64, forward differences. jacrun: "
        "`SparseJacobian.evaluate` of the `autodiff: fd` function (the colouring of its declared "
        "pattern, f on batches of perturbed rows), on every core and on one; SciPy: "
        "`approx_derivative(method='2-point', sparsity=(pattern, group_columns(pattern)))` looped "
        "over 16 of the samples. `agreement`: jacrun's Jacobian of sample 0 against SciPy's (the "
        "same steps), relative to its largest entry.",
        "",
        table(result.rows),
        "",
        "Each method, jacrun on every core, against the exact Jacobian (largest entry error relative "
        "to the largest entry, worst of the samples):",
        "",
        methods_table(result.methods),
        "",
        "The size of f's calls (`fd.call_memory`: perturbed rows and outputs per call), 9-point "
        "stencil, forward differences, one core, blocks of 64 samples, Jacobians/s:",
        "",
        calls_table(result.call_memory),
        "",
    ]
    job = result.job
    if job is None:
        return "\n".join([*lines, "The job runs in full runs only (`--quick` skips it)."])
    total = max(sum(job.steps.values()), 1e-12)
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in job.steps.items() if v / total >= 0.005)
    return "\n".join(
        [
            *lines,
            f"One job through `jacrun.submit`: {job.samples:,} sparse Jacobians of the 9-point stencil "
            f"(n = {job.grid**2:,}), forward differences, float32 store, `save_outputs: false`, on a "
            "2-worker local cluster that `submit` starts and stops (both included). SciPy loop: its "
            f"time on the job's first {job.scipy_timed} inputs, right before and right after the job "
            f"(the mean), times {job.samples // job.scipy_timed}.",
            "",
            job_table(job),
            "",
            f"Time in the job's blocks: {shares or 'not recorded'}.",
        ]
    )


def targets(result: FdResult | None) -> list[Target]:
    if result is None:
        return []
    out = []
    for grid in (64, 128):
        row = next((r for r in result.rows if r.name == f"9-point stencil L={grid}"), None)
        ratio = None if row is None else _ratio(row, "jacrun")
        out.append(Target(f"fd 9-point n={grid * grid:,}: >= 3x approx_derivative Jacobians/s", ratio, 3.0))
    fewest = min((r.groups - r.colours for r in result.rows), default=None)
    out.append(
        Target("fd colours no more than SciPy's groups (SciPy - jacrun, fewest)", fewest, 0, "{:+.0f}")
    )
    job = result.job
    speedup = None
    if job is not None and job.ok:
        speedup = job.scipy_seconds / job.seconds
    out.append(
        Target("fd job of 10,000 at n=4,096: >= 3x SciPy's loop, cluster start included", speedup, 3.0)
    )
    accuracy = {"forward": 1e-6, "central": 1e-8, "complex": 1e-13}
    for method, bound in accuracy.items():
        error = max((r.error for r in result.methods if r.method == method), default=None)
        out.append(
            Target(
                f"fd {method}: error against the exact Jacobian below {bound:g}",
                error,
                bound,
                "{:.1e}",
                below=True,
            )
        )
    return out
