"""Section ``kernels``: jacrun's kernels in process against a GEMM and the frameworks.

MLP vjp, jvp and per-sample Jacobians (float32 and float64) and the Lorenz-96 adjoint: time,
throughput, GFLOP/s and % of the NumPy GEMM peak (a square matmul timed in the same rounds),
and the same work through torch.func, jax and HIPS autograd as ratios (framework time /
jacrun time: above 1, jacrun is faster). Every framework's result is checked against jacrun's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jacrun_bench.common import Context, Log, Shapes, Target, gemm_probe, rel_diff, rounds
from jacrun_bench.frameworks import FRAMEWORKS, framework_lorenz96, framework_mlp, usable

NAME = "kernels"
TITLE = "Kernels (in process)"
HELP = "skip the in-process kernel rows (cluster jobs only)"

TOLERANCE = {"float32": 2e-3, "float64": 1e-8}
"""Largest relative difference (max |a - b| / max |b|) accepted between a framework and jacrun."""

CASES = [(f"mlp {mode}", dtype) for dtype in ("float32", "float64") for mode in ("vjp", "jvp", "jacobian")]
CASES += [("lorenz96 vjp", "float64"), ("lorenz96 vjp", "float32")]


@dataclass
class Row:
    kernel: str
    dtype: str
    shape: str
    seconds: float
    unit: str  # "VJPs", "JVPs", "Jacobians"
    count: int  # products (or Jacobians) per call
    flops: float  # GEMM FLOPs per call (NaN: elementwise kernel, no GEMM peak)
    peak: float  # GEMM FLOP/s measured in the same rounds
    frameworks: dict[str, tuple[str, float, float] | str] = field(default_factory=dict)
    """framework -> (label, seconds, relative difference) or a reason it is absent."""

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9

    @property
    def peak_fraction(self) -> float:
        return self.flops / self.seconds / self.peak

    def ratio(self, framework: str) -> float | None:
        entry = self.frameworks.get(framework)
        return entry[1] / self.seconds if isinstance(entry, tuple) else None


def mlp_flops(sizes: Sequence[int], batch: int, k: int, mode: str) -> float:
    """GEMM FLOPs the work needs: the forward pass plus one pass per vector; for the Jacobian
    (reverse, over the m output basis vectors) the first reverse product e_i^T W_last is a row of
    W_last, so only the (m x m) @ W_last product and the remaining layers count."""
    layer = [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    forward = 2.0 * batch * sum(layer)
    if mode == "jacobian":
        m = sizes[-1]
        return forward + 2.0 * m * layer[-1] + 2.0 * batch * m * sum(layer[:-1])
    return forward + 2.0 * batch * k * sum(layer)


def bench_mlp(shapes: Shapes, dtype: str, mode: str, frameworks: dict[str, str], log: Log) -> Row:
    from jacrun.functions import build_function

    sizes = list(shapes.sizes)
    f = build_function({"kind": "mlp", "sizes": sizes, "activation": "tanh", "seed": 0, "dtype": dtype})
    batch = shapes.jacobian_batch if mode == "jacobian" else shapes.batch
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, f.n_in)).astype(dtype)
    width = f.n_out if mode == "vjp" else f.n_in
    vec = rng.standard_normal((batch, width)).astype(dtype)
    if mode == "vjp":
        ours = lambda: f.vjp_batch(x, vec[:, None, :])  # noqa: E731
    elif mode == "jvp":
        ours = lambda: f.jvp_batch(x, vec[:, None, :])  # noqa: E731
    else:
        ours = lambda: f.jacobian(x, "rev")  # noqa: E731
    reference = ours()[1]
    reference = reference[:, 0] if mode != "jacobian" else reference
    weights, biases = list(f.weights), list(f.biases)
    gemm, gemm_flops = gemm_probe(shapes.gemm, dtype)
    contenders: dict[str, Callable[[], Any]] = {"jacrun": ours, "gemm": gemm}
    labels: dict[str, tuple[str, float]] = {}
    absent: dict[str, tuple[str, float, float] | str] = {}
    for name, version in frameworks.items():
        if not usable(version):
            absent[name] = version
            continue
        made = framework_mlp(name, mode, weights, biases, x, vec)
        if made is None:
            absent[name] = "n/a"
            continue
        label, thunk, to_numpy = made
        diff = rel_diff(to_numpy(thunk()), reference)
        contenders[name] = thunk
        labels[name] = (label, diff)
    reps = max(3, shapes.reps - 2) if mode == "jacobian" else shapes.reps
    times = rounds(contenders, reps)
    k = f.n_out if mode == "jacobian" else 1
    unit = {"vjp": "VJPs", "jvp": "JVPs", "jacobian": "Jacobians"}[mode]
    row = Row(
        kernel=f"mlp {mode}",
        dtype=dtype,
        shape=f"{'-'.join(map(str, sizes))}, B={batch}" + (f" ({k} rows each)" if mode == "jacobian" else ""),
        seconds=times["jacrun"],
        unit=unit,
        count=batch,
        flops=mlp_flops(sizes, batch, 1, mode),
        peak=gemm_flops / times["gemm"],
        frameworks=absent,
    )
    for name, (label, diff) in labels.items():
        row.frameworks[name] = (label, times[name], diff)
    log(f"  {row.kernel} {dtype}: {row.seconds * 1e3:.1f} ms, {row.peak_fraction:.0%} of GEMM peak")
    return row


def bench_lorenz96(shapes: Shapes, dtype: str, frameworks: dict[str, str], log: Log) -> Row:
    from jacrun.functions import build_function

    spec = {"kind": "lorenz96", "dim": shapes.l96_dim, "steps": shapes.l96_steps, "dtype": dtype}
    f = build_function(spec)
    rng = np.random.default_rng(2)
    x = (8.0 + rng.standard_normal((shapes.l96_batch, f.n_in))).astype(dtype)
    v = rng.standard_normal((shapes.l96_batch, f.n_in)).astype(dtype)
    ours = lambda: f.vjp_batch(x, v[:, None, :])  # noqa: E731
    reference = ours()[1][:, 0]
    gemm, gemm_flops = gemm_probe(shapes.gemm, dtype)
    contenders: dict[str, Callable[[], Any]] = {"jacrun": ours, "gemm": gemm}
    row = Row(
        kernel="lorenz96 vjp",
        dtype=dtype,
        shape=f"dim {f.n_in}, {shapes.l96_steps} RK4 steps, B={shapes.l96_batch}",
        seconds=math.nan,
        unit="VJPs",
        count=shapes.l96_batch,
        flops=math.nan,
        peak=math.nan,
    )
    diffs = {}
    for name, version in frameworks.items():
        if not usable(version):
            row.frameworks[name] = version
            continue
        made = framework_lorenz96(name, f.n_in, f.forcing, f.dt, f.steps, x, v)
        if made is None:
            row.frameworks[name] = "n/a"
            continue
        label, thunk, to_numpy = made
        diffs[name] = (label, rel_diff(to_numpy(thunk()), reference))
        contenders[name] = thunk
    times = rounds(contenders, max(3, shapes.reps - 2))
    row.seconds, row.peak = times["jacrun"], gemm_flops / times["gemm"]
    row.flops = f.flops(shapes.l96_batch, 1, "vjp")  # elementwise FLOPs (the cost model's count)
    for name, (label, diff) in diffs.items():
        row.frameworks[name] = (label, times[name], diff)
    log(f"  {row.kernel} {dtype}: {row.seconds * 1e3:.1f} ms")
    return row


def kernel_table(rows: Sequence[Row]) -> str:
    lines = [
        "| kernel | dtype | shape | jacrun | throughput | GFLOP/s | % of GEMM peak "
        "| vs torch | vs jax | vs autograd |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        gemm_kernel = row.kernel.startswith("mlp")
        pct = f"{row.peak_fraction:.0%} of {row.peak / 1e9:.0f}" if gemm_kernel else "n/a (no GEMM)"
        cells = [
            row.kernel,
            row.dtype,
            row.shape,
            f"{row.seconds * 1e3:,.1f} ms",
            f"{row.count / row.seconds:,.0f} {row.unit}/s",
            f"{row.gflops:,.0f}" if gemm_kernel else f"{row.gflops:,.1f} (elementwise)",
            pct,
        ]
        for name in FRAMEWORKS:
            entry = row.frameworks.get(name, "n/a")
            if isinstance(entry, str):
                cells.append(entry)
                continue
            label, seconds, diff = entry
            flag = (
                ""
                if diff <= TOLERANCE[row.dtype] * (100 if row.kernel.startswith("lorenz") else 1)
                else (f" MISMATCH {diff:.1e}")
            )
            cells.append(f"**{seconds / row.seconds:.2f}x** ({label} {seconds * 1e3:,.0f} ms){flag}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(ctx: Context) -> list[Row]:
    rows = []
    for name, dtype in CASES:
        if ctx.only and ctx.only not in name:
            continue
        if name.startswith("mlp"):
            rows.append(bench_mlp(ctx.shapes, dtype, name.split()[1], ctx.frameworks, ctx.log))
        else:
            rows.append(bench_lorenz96(ctx.shapes, dtype, ctx.frameworks, ctx.log))
    return rows


def render(rows: list[Row], ctx: Context) -> str:
    return "\n".join(
        [
            "Median of rounds that run every contender once; `% of GEMM peak` against a "
            f"{ctx.shapes.gemm}x{ctx.shapes.gemm} `np.matmul` timed in the same rounds (GFLOP/s "
            "after 'of'). `vs X` is X's time / jacrun's time: above 1, jacrun is faster. One vector "
            "per sample for vjp/jvp; Jacobians by reverse mode over the output basis. FLOPs: the "
            "matrix products the work needs (forward pass and one pass per vector; lorenz96: the "
            "cost model's elementwise count).",
            "",
            kernel_table(rows),
        ]
    )


def targets(rows: Sequence[Row]) -> list[Target]:
    """The kernels' targets: the GEMM peak, and ratios to torch and jax."""
    out = []
    for row in rows:
        if row.kernel == "mlp vjp":
            out += [
                Target(f"mlp vjp {row.dtype} >= 90% of GEMM peak", row.peak_fraction, 0.9, "{:.0%}"),
                Target(f"mlp vjp {row.dtype} >= 1.2x torch.func.vjp", row.ratio("torch"), 1.2),
                Target(f"mlp vjp {row.dtype} >= 1.1x jax jit(vjp)", row.ratio("jax"), 1.1),
            ]
        elif row.kernel == "mlp jacobian":
            out += [
                Target(f"mlp jacobian {row.dtype} >= 1.5x torch vmap(jacrev)", row.ratio("torch"), 1.5),
                Target(f"mlp jacobian {row.dtype} >= 1.2x jax vmap(jacrev)", row.ratio("jax"), 1.2),
            ]
        elif row.kernel == "lorenz96 vjp":
            out.append(Target(f"lorenz96 vjp {row.dtype} >= torch autograd", row.ratio("torch"), 1.0))
    return out
