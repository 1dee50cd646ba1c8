"""Section ``sparse``: sparse Jacobians of two stencil residuals against asdex, both ways.

The residuals (``examples/stencils/stencil_residuals.py``; float64, L x L grids, n = m = L^2):
``bratu`` (jacrun's built-in) and the 9-point Allen-Cahn residual (not shipped). In process,
per residual and L, every contender on the same ``SAMPLES`` inputs, the Jacobians only:

- built-in (bratu): ``SparseJacobian.evaluate`` with ``Bratu.sparse_nonzeros`` (the gathered
  products formed directly), on every core, into a reused buffer;
- NumPy Function: the general path of a NumPy Function (its ``vjp_batch`` on the seeds in
  cache-sized ranges on the kernel threads, then the gather): bratu without its shortcut, and
  the ``AllenCahn9`` class;
- jax adapter, torch adapter: ``kind: python`` with ``autodiff: jax | torch`` on the plain
  function, whose blocks take the fused path (``Function.fused_nonzeros``), into the same
  reused buffer as the NumPy rows; and the jax adapter as a block calls it, returning its own
  arrays (XLA's buffer, not copied, where one call covers the samples). jacrun's JAX use is
  the better of the two, as asdex's is the better of its loop and vmap;
- asdex loop: ``jax.jit(asdex.jacobian_from_coloring(F, colouring))`` one sample at a time,
  every sample's result kept (a list);
  asdex vmap: ``jax.jit(jax.vmap(...))`` of the same over the batch; jacrun is compared with
  the better of the two;
- jax dense, torch dense (bratu, where a batch of dense Jacobians fits): ``vmap(jacfwd)``;
- fill (bratu): ``ndarray.fill`` in row ranges on the kernel threads, of the buffer the
  built-in writes (the bound for that buffer, in cache at small L) and of :data:`LARGE_FILL`
  bytes (the machine's write bandwidth to memory): what the built-in is measured against.

Every contender's Jacobian is checked against the NumPy path's, and each adapter's fused
nonzeros against its general path. Then the jobs of :mod:`jacrun_bench.sparse_jobs`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from jacrun_bench import colourings, residuals
from jacrun_bench.colourings import ColouringRow
from jacrun_bench.common import Context, Target, rounds
from jacrun_bench.e2e import local_cluster
from jacrun_bench.frameworks import usable
from jacrun_bench.residuals import Residual
from jacrun_bench.sparse_jobs import SparseJob, bench_bratu_job, bench_jax_job, job_table

NAME = "sparse"
TITLE = "Sparse Jacobians (bratu and a 9-point residual, float64)"
HELP = "skip the sparse Jacobians (two stencil residuals against asdex, jacrun's jobs)"
MIN_SECONDS = 0.25
"""Each contender runs for at least this long per round: throughput, not a thread pool's wake-up."""
SAMPLES = 32
"""Samples per call of every contender."""
GRIDS = (32, 64, 128, 256)
LARGE_FILL = 256 << 20
"""Bytes of the large fill: far beyond the caches."""
ASDEX = ("asdex loop", "asdex vmap")
OWN = "jax adapter, own arrays"
"""The jax adapter as a block calls it: no buffer given, so XLA's own result where one call
covers the samples (the other rows write into the reused buffer)."""
JACRUN = ("built-in", "NumPy Function", "jax adapter", OWN, "torch adapter")
COLUMNS = (*JACRUN, *ASDEX, "jax dense", "torch dense")


@dataclass
class SparseRow:
    residual: Residual
    grid: int
    nnz: int
    colours: int
    rates: dict[str, float]
    """Jacobians per second of each contender."""
    their_colours: int | None = None
    errors: dict[str, float] = field(default_factory=dict)
    """Each contender's Jacobian of sample 0 against the NumPy path's (relative, every entry)."""
    fused_errors: dict[str, float] = field(default_factory=dict)
    """Each adapter's fused nonzeros against its general path (relative)."""
    fill_bytes_per_second: float | None = None
    """``ndarray.fill`` of the built-in's buffer, bytes per second."""
    memory_bytes_per_second: float | None = None
    """``ndarray.fill`` of :data:`LARGE_FILL` bytes: the write bandwidth to memory."""

    def best_asdex(self) -> float | None:
        rates = [self.rates[name] for name in ASDEX if name in self.rates]
        return max(rates) if rates else None

    def against_asdex(self, name: str) -> float | None:
        best = self.best_asdex()
        return self.rates[name] / best if best and name in self.rates else None

    def best_jax(self) -> float | None:
        """jacrun's JAX adapter, the better of its two uses, over the better asdex."""
        ratios = [r for r in (self.against_asdex("jax adapter"), self.against_asdex(OWN)) if r is not None]
        return max(ratios) if ratios else None

    def written(self) -> float | None:
        """Bytes of nonzeros the built-in writes per second."""
        return self.rates["built-in"] * self.nnz * 8 if "built-in" in self.rates else None


class _GeneralPath:
    """``f`` on the general path: its kernel on the seeds in ranges, then the gather (no
    ``sparse_nonzeros`` shortcut, no fused path)."""

    def __init__(self, f) -> None:
        self.f, self.dtype = f, f.dtype

    def fused_nonzeros(self, x, sparse, out=None, outputs=True) -> None:
        return None

    def fused_work_bytes(self, sparse, rows) -> None:
        return None

    def sparse_nonzeros(self, x, sparse, out, outputs=True):
        return sparse.gather_products(self.f, x, out)


def _fill_probe(out: np.ndarray) -> Callable[[], None]:
    """Fill ``out`` in row ranges on the kernel threads, as the built-in writes its nonzeros."""
    from jacrun.functions.parallel import for_row_ranges, kernel_threads

    rows = out.shape[0]
    threads = max(1, min(kernel_threads(), rows))
    span = -(-rows // threads)

    def fill(start: int, stop: int, slot: int) -> None:
        out[start:stop].fill(-1.0)

    return lambda: for_row_ranges(rows, threads, span, fill)


def bench_grid(
    residual: Residual,
    grid: int,
    samples: int,
    reps: int,
    frameworks: set[str],
    log: Callable[[str], None],
    min_seconds: float = MIN_SECONDS,
) -> SparseRow:
    """One row: every contender on ``samples`` inputs of ``residual`` on an L x L grid."""
    from jacrun.sources import random_rows
    from jacrun.sparsity import choose

    numpy_f = residuals.builtin_bratu(grid) if residual == "bratu" else residuals.numpy_allen_cahn(grid)
    n = numpy_f.n_in
    sparse = choose(numpy_f.sparsity(), "auto", "declared")
    x = random_rows("uniform", 1, 1, 0, samples, n)
    out = np.empty((samples, sparse.nnz))
    general = _GeneralPath(numpy_f)
    contenders: dict[str, Callable[[], Any]] = {
        "NumPy Function": lambda: sparse.evaluate(general, x, out=out, outputs=False)
    }
    reference = sparse.evaluate(general, x[:4])[1]  # sample 0's is the one every contender matches
    check: dict[str, Callable[[], Any]] = {}  # name -> sample 0's Jacobian, theirs
    fused_errors: dict[str, float] = {}
    if residual == "bratu":
        contenders["built-in"] = lambda: sparse.evaluate(numpy_f, x, out=out, outputs=False)
        contenders["fill"] = _fill_probe(out)
        large = np.empty((max(1, LARGE_FILL // out[0].nbytes), sparse.nnz))
        contenders["large fill"] = _fill_probe(large)
        check["built-in"] = lambda: sparse.csr(sparse.evaluate(numpy_f, x[:1])[1][0])
    counts = dict.fromkeys(contenders, samples)
    for backend in ("jax", "torch"):
        if backend in frameworks:
            f = residuals.adapter(residual, backend, grid)
            name = f"{backend} adapter"
            contenders[name] = lambda f=f: sparse.evaluate(f, x, out=out, outputs=False)
            counts[name] = samples
            if backend == "jax":
                contenders[OWN] = lambda f=f: sparse.evaluate(f, x, outputs=False)
                counts[OWN] = samples
            fused = sparse.evaluate(f, x[:4])[1]
            check[name] = lambda fused=fused: sparse.csr(fused[0])
            fused_errors[name] = _relative(fused, sparse.evaluate(_GeneralPath(f), x[:4])[1])
    their_colours = None
    if "jax" in frameworks:
        their_colours = _asdex(residual, grid, x, contenders, counts, check)
        if residual == "bratu" and n * n * 8 * min(samples, 16) < 1 << 30:
            import jax

            dense = jax.jit(jax.vmap(jax.jacfwd(residuals.plain(residual, "jax", grid))))
            batch = x[: min(samples, 16)]
            counts["jax dense"] = len(batch)
            contenders["jax dense"] = lambda: jax.block_until_ready(dense(batch))
            check["jax dense"] = lambda: np.asarray(dense(batch)[0])
    if "torch" in frameworks and residual == "bratu" and n <= 1024:  # dense torch: 22 J/s at n = 1024
        import torch
        from torch.func import jacfwd, vmap

        dense_t = vmap(jacfwd(residuals.plain(residual, "torch", grid)))
        batch_t = torch.from_numpy(x[: min(samples, 4)])
        counts["torch dense"] = len(batch_t)
        contenders["torch dense"] = lambda: dense_t(batch_t)
        check["torch dense"] = lambda: dense_t(batch_t)[0].numpy()
    seconds = rounds(contenders, reps, warmup=1, min_seconds=min_seconds)
    fill = seconds.pop("fill", None)
    large_fill = seconds.pop("large fill", None)
    rates = {name: counts[name] / value for name, value in seconds.items()}
    for name, rate in rates.items():
        log(f"  {residual} L={grid}: {name} {rate:,.0f} Jacobians/s")
    errors = {name: _nonzero_error(sparse, reference[0], theirs()) for name, theirs in check.items()}
    return SparseRow(
        residual,
        grid,
        sparse.nnz,
        sparse.n_colours,
        rates,
        their_colours,
        errors,
        fused_errors,
        None if fill is None else out.nbytes / fill,
        None if large_fill is None else large.nbytes / large_fill,
    )


def _asdex(residual: Residual, grid: int, x: np.ndarray, contenders, counts, check) -> int | None:
    """Add asdex's two uses to ``contenders``; its colours (None without asdex)."""
    try:
        import asdex
    except ImportError:
        return None
    import jax

    f = residuals.plain(residual, "jax", grid)
    colouring = asdex.jacobian_coloring(f, np.zeros(x.shape[1]))
    one = asdex.jacobian_from_coloring(f, colouring)
    loop, batched = jax.jit(one), jax.jit(jax.vmap(one))

    def run_loop() -> None:  # every sample's Jacobian kept, as each contender returns them all
        jax.block_until_ready([loop(row) for row in x])

    contenders["asdex loop"] = run_loop
    contenders["asdex vmap"] = lambda: jax.block_until_ready(batched(x))
    counts["asdex loop"] = counts["asdex vmap"] = len(x)
    check["asdex loop"] = lambda: _bcoo_to_csr(loop(x[0]))
    check["asdex vmap"] = lambda: _bcoo_to_csr(batched(x[:2]), sample=0)
    return int(colouring.num_colors)


def _bcoo_to_csr(matrix, sample: int | None = None) -> sp.csr_array:
    """A JAX BCOO matrix (or ``sample`` of a batch of them) as a scipy CSR one, not densified."""
    indices = np.asarray(matrix.indices)
    data = np.asarray(matrix.data)
    shape = matrix.shape
    if sample is not None:
        indices, data, shape = indices[sample], data[sample], shape[1:]
    return sp.csr_array((data, (indices[:, 0], indices[:, 1])), shape=shape)


def _nonzero_error(sparse, values: np.ndarray, theirs) -> float:
    """max |J_theirs - J_jacrun| / max |J_jacrun| over every entry (theirs dense or scipy)."""
    ours = sparse.csr(values)
    difference = abs(sp.csr_array(theirs) - ours)
    return float(difference.max() / abs(ours).max())


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---- report ----------------------------------------------------------------------------------


def table(rows: list[SparseRow]) -> str:
    """Jacobians per second of every contender, and jacrun's against the better asdex."""
    names = [name for name in COLUMNS if any(name in row.rates for row in rows)]
    ours = [name for name in JACRUN if name in names]
    lines = [
        "| L | n | nonzeros | colours (jacrun / asdex) | "
        + " | ".join(f"{name} J/s" for name in names)
        + " | "
        + " | ".join(f"{name} / best asdex" for name in ours)
        + " | agreement |",
        "|---|---|---|---|" + "---:|" * len(names) + "---|" * len(ours) + "---|",
    ]
    for row in rows:
        rates = [f"{row.rates[name]:,.0f}" if name in row.rates else "-" for name in names]
        ratios = [_fmt(row.against_asdex(name)) for name in ours]
        worst = f"{max(row.errors.values()):.1e}" if row.errors else "-"
        lines.append(
            f"| {row.grid} | {row.grid**2:,} | {row.nnz:,} | {row.colours} / {row.their_colours or '-'} | "
            + " | ".join(rates)
            + " | "
            + " | ".join(ratios)
            + f" | {worst} |"
        )
    return "\n".join(lines)


def write_table(rows: list[SparseRow]) -> str:
    """The built-in's nonzeros written per second against the fills' bandwidths."""
    lines = [
        "| L | built-in J/s | nonzeros written | fill of that buffer | share | fill of 256 MiB | share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        written = row.written()
        if written is None or row.fill_bytes_per_second is None or row.memory_bytes_per_second is None:
            continue
        lines.append(
            f"| {row.grid} | {row.rates['built-in']:,.0f} | {written / 1e9:.2f} GB/s | "
            f"{row.fill_bytes_per_second / 1e9:.2f} GB/s | {written / row.fill_bytes_per_second:.0%} | "
            f"{row.memory_bytes_per_second / 1e9:.2f} GB/s | {written / row.memory_bytes_per_second:.0%} |"
        )
    return "\n".join(lines)


def _fmt(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


@dataclass
class SparseResult:
    rows: list[SparseRow]
    jobs: list[SparseJob]
    reps: int
    samples: int
    colourings: list[ColouringRow] = field(default_factory=list)


def measure(ctx: Context) -> SparseResult:
    frameworks = {name for name, version in ctx.frameworks.items() if usable(version)}
    grids = (8,) if ctx.quick else GRIDS
    reps = 1 if ctx.quick else ctx.shapes.reps
    samples = 4 if ctx.quick else SAMPLES
    min_seconds = 0.0 if ctx.quick else MIN_SECONDS
    rows = [
        bench_grid(residual, grid, samples, reps, frameworks, ctx.log, min_seconds)
        for residual in residuals.RESIDUALS
        for grid in grids
    ]
    ctx.log("sparse: colourings")
    coloured = colourings.measure(ctx.quick, asdex="jax" in frameworks)
    jobs = []
    with tempfile.TemporaryDirectory() as folder, local_cluster() as (address, fresh_workers, _):
        cluster = (address, fresh_workers)
        bratu = (8, 100, 20) if ctx.quick else (256, 2000, "auto")
        jobs.append(bench_bratu_job(*bratu, Path(folder), cluster, ctx.log))
        if "jax" in frameworks and not ctx.quick:  # tests/test_fused_sparse.py runs one in the smoke tests
            jobs.append(bench_jax_job(128, 1000, "auto", Path(folder), cluster, ctx.log))
    return SparseResult(rows, jobs, reps, samples, coloured)


def render(result: SparseResult, ctx: Context) -> str:
    by_residual = {name: [row for row in result.rows if row.residual == name] for name in residuals.RESIDUALS}
    rates = {}
    for job in result.jobs:
        name = "built-in" if job.what == "bratu" else OWN
        residual = "bratu" if job.what == "bratu" else "9-point"
        row = next((r for r in by_residual[residual] if r.grid == job.grid), None)
        if row is not None and name in row.rates:
            rates[job.what] = row.rates[name]
    fused = [e for row in result.rows for e in row.fused_errors.values()]
    parts = [
        f"Jacobians per second in process on {result.samples} samples, medians of {result.reps} "
        f"rounds of at least {MIN_SECONDS} s each. jacrun's rows are `SparseJacobian.evaluate` as a "
        "block runs it, into one reused buffer: `built-in` is bratu's own nonzeros, `NumPy "
        "Function` the general path (products on the seeds, then the gather), `jax adapter` and "
        "`torch adapter` the fused path of `autodiff: jax | torch`; `jax adapter, own arrays` "
        "the same without a buffer, as a block calls it. asdex runs one sample at a "
        "time under `jit`, keeping every result (loop), and `jax.jit(jax.vmap(...))` over the "
        "batch (vmap); `/ best asdex` divides by the better of the two. `agreement`: the largest "
        "entry difference from the NumPy path's Jacobian, relative to its largest entry."
        + (
            f" The fused nonzeros agree with each adapter's general path to {max(fused):.1e}."
            if fused
            else ""
        ),
    ]
    for residual, rows in by_residual.items():
        if rows:
            parts += ["", f"**{residual}**", "", table(rows)]
    writes = write_table(by_residual["bratu"])
    if len(writes.splitlines()) > 2:
        parts += [
            "",
            "The built-in's nonzeros (8 bytes each) written per second, against `ndarray.fill` in "
            "row ranges on the same kernel threads, timed in the same rounds: of the buffer the "
            "built-in writes (in cache at small L), and of 256 MiB (the write bandwidth to memory):",
            "",
            writes,
        ]
    if result.colourings:
        parts += [
            "",
            "Colourings (columns, forward mode): jacrun's colours and seconds against asdex's "
            "`color_cols` and the optimum (on a stencil, the size of the stencil: its points "
            "conflict pairwise; on a random pattern, only its longest row bounds it):",
            "",
            colourings.table(result.colourings),
        ]
    parts += [
        "",
        "Jobs through `jacrun.submit` on a fresh 2-worker local cluster (`save_outputs: false`); "
        "`of in-process` divides by the row of the same L above (all cores, one process); the "
        "bratu job is then killed part-way and resumed from the command line:",
        "",
        job_table(result.jobs, rates),
    ]
    return "\n".join(parts)


def targets(result: SparseResult | None) -> list[Target]:
    if result is None:
        return []
    out = []
    for row in result.rows:
        label = f"{row.residual} L={row.grid}"
        if row.residual == "bratu":
            out.append(
                Target(f"{label}: built-in >= 1.3x the better asdex", row.against_asdex("built-in"), 1.3)
            )
        out.append(
            Target(f"{label}: jax adapter (its better use) >= 1.0x the better asdex", row.best_jax(), 1.0)
        )
        fewer = None if row.their_colours is None else row.their_colours - row.colours
        out.append(Target(f"{label}: colours no more than asdex's (asdex - jacrun)", fewer, 0, "{:+.0f}"))
    for row in result.colourings:
        if row.their_colours is not None:
            out.append(
                Target(
                    f"{row.pattern}: colours no more than asdex's (asdex - jacrun)",
                    row.their_colours - row.colours,
                    0,
                    "{:+.0f}",
                )
            )
        if row.optimal:
            out.append(
                Target(
                    f"{row.pattern}: colours / optimum",
                    row.colours / row.lower_bound,
                    1.2,
                    "{:.2f}",
                    below=True,
                )
            )
    dense = next((row for row in result.rows if row.residual == "bratu" and "jax dense" in row.rates), None)
    if dense is not None and "built-in" in dense.rates:
        value = dense.rates["built-in"] / dense.rates["jax dense"]
        out.append(
            Target(f"bratu L={dense.grid}: >= 100x dense jax.vmap(jax.jacfwd)", value, 100.0, "{:.0f}x")
        )
    for job in result.jobs:
        out.append(
            Target(
                f"sparse job ({job.what}): peak worker memory / projection",
                job.peak_increase / job.projected,
                1.0,
                "{:.2f}",
                below=True,
            )
        )
        if job.resume_ok is not None:
            out.append(
                Target(
                    f"sparse job ({job.what}): resumed after a kill (1 = complete)",
                    float(job.resume_ok),
                    1.0,
                    "{:.0f}",
                )
            )
    errors = [e for row in result.rows for e in row.errors.values()] + [job.max_error for job in result.jobs]
    if errors:
        out.append(
            Target(
                "values agree with dense Jacobians (max relative error)",
                max(errors),
                1e-12,
                "{:.1e}",
                below=True,
            )
        )
    fused = [e for row in result.rows for e in row.fused_errors.values()]
    if fused:
        out.append(
            Target(
                "fused nonzeros agree with the general path (max relative error)",
                max(fused),
                1e-15,
                "{:.1e}",
                below=True,
            )
        )
    return out
