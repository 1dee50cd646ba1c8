"""Benchmark jacrun's kernels and its job runner, in one run, on the same data.

Prints markdown tables:

1. **Kernels**: MLP vjp, jvp and per-sample Jacobians (float32 and float64) and the Lorenz-96
   adjoint, in process: time, throughput, GFLOP/s and % of the NumPy GEMM peak (a square
   matmul timed in the same rounds), and the same work through torch.func, jax and HIPS
   autograd, as ratios (framework time / jacrun time: above 1, jacrun is faster). Every
   framework's result is checked against jacrun's.
2. **End to end**: ``jacrun.submit`` on a local cluster of 2 workers x 1 thread against the
   in-process kernel on the same work, and the peak worker memory of a job of N and of 8N
   samples against the plan's projected memory per block.
3. The BLAS library and kernel in use (threadpoolctl), and, when ``scripts/bench_adapters.py``
   is present, its table (jacrun's autodiff adapters against the frameworks).

Timings are medians over rounds that run every contender once, in turn, after warm-up runs,
so a busy machine slows all of them alike. Run the real benchmark as

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench.py --output bench.md

(those variables, when set, pin OpenBLAS to an older, slower kernel). ``--quick`` runs small
shapes in seconds (a smoke test, not a measurement); ``--skip-e2e`` skips the cluster jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# NumPy asks the kernel for huge pages on arrays of 4 MiB and more. Once torch and jax have
# fragmented this process's memory, every fresh large result (a B=256 Jacobian is 268 MB) then
# stalls in the kernel's page compaction: jacrun's Jacobian row measured 1410 ms instead of
# 1206 ms. NumPy's documented switch turns that off for the NumPy contenders (jacrun, the GEMM
# peak, autograd); torch and jax use their own allocators. Set it to 1 to see the effect.
# The cluster's workers (which run no framework) keep NumPy's default: the variable is set only
# while this process imports NumPy, and only when this file runs as the main script (worker
# processes are spawned, re-import it as __mp_main__, and inherit this process's environment).
_USER_HUGEPAGE = os.environ.get("NUMPY_MADVISE_HUGEPAGE")
if __name__ == "__main__" and _USER_HUGEPAGE is None:
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"

import numpy as np  # noqa: E402

if _USER_HUGEPAGE is None:
    os.environ.pop("NUMPY_MADVISE_HUGEPAGE", None)

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "autograd")


@dataclass(frozen=True)
class Shapes:
    """The problem sizes of one run."""

    sizes: tuple[int, ...]  # MLP widths n, hidden..., m
    batch: int  # samples of the vjp/jvp rows (one vector per sample)
    jacobian_batch: int  # samples of the Jacobian rows
    l96_dim: int
    l96_steps: int
    l96_batch: int
    gemm: int  # side of the square GEMM that measures the peak
    reps: int  # timed rounds (medians)
    e2e_samples: int  # N of the end-to-end jobs (the large one has 8N)
    e2e_sizes: tuple[int, ...]
    e2e_block: int  # samples per block (the same in both jobs, so their memory compares)
    e2e_jacobian_samples: int  # samples of the end-to-end Jacobian job
    e2e_jacobian_block: int


FULL = Shapes(
    sizes=(512, 1024, 1024, 256),
    batch=4096,
    jacobian_batch=256,
    l96_dim=40,
    l96_steps=100,
    l96_batch=4096,
    gemm=2048,
    reps=7,
    e2e_samples=87_500,  # 8N = 700,000 samples: 2.15 GB of vjp + y in float32
    e2e_sizes=(512, 1024, 1024, 256),
    e2e_block=8192,
    e2e_jacobian_samples=4096,  # 4096 x 256 x 512 float32: 2.15 GB of Jacobians
    e2e_jacobian_block=64,
)
QUICK = Shapes(
    sizes=(64, 128, 128, 32),
    batch=256,
    jacobian_batch=16,
    l96_dim=40,
    l96_steps=10,
    l96_batch=256,
    gemm=256,
    reps=3,
    e2e_samples=2_000,
    e2e_sizes=(64, 128, 128, 32),
    e2e_block=500,
    e2e_jacobian_samples=200,
    e2e_jacobian_block=50,
)

TOLERANCE = {"float32": 2e-3, "float64": 1e-8}
"""Largest relative difference (max |a - b| / max |b|) accepted between a framework and jacrun."""


# ---- timing ----------------------------------------------------------------------------------


PAUSE = 0.3
"""Seconds between two contenders: the thread pools of the one before (OpenBLAS, OpenMP in
torch, Eigen in XLA) stop spinning and leave the cores to the next one. Right after a torch
call, a jacrun Jacobian measured 7% slower than after a 1 s pause; 50 ms was not enough."""


def rounds(contenders: dict[str, Callable[[], Any]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each contender over ``reps`` rounds that run every contender once."""
    for _ in range(warmup):
        for run in contenders.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, run in contenders.items():
            time.sleep(PAUSE)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def gemm_probe(size: int, dtype: str) -> tuple[Callable[[], Any], float]:
    """A square ``np.matmul(a, b, out=c)`` and its FLOPs: the NumPy GEMM peak of this machine."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    c = np.empty_like(a)
    return (lambda: np.matmul(a, b, out=c)), 2.0 * size**3


def rel_diff(a: Any, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ---- frameworks ------------------------------------------------------------------------------


def available(frameworks: Sequence[str]) -> dict[str, str]:
    """framework -> its version, or why it is left out: "not installed" or "skipped"."""
    out: dict[str, str] = {}
    for name in FRAMEWORKS:
        if name not in frameworks:
            out[name] = "skipped"
        elif importlib.util.find_spec(name) is None:
            out[name] = "not installed"
        else:
            module = importlib.import_module(name)
            if name == "jax":
                module.config.update("jax_enable_x64", True)  # float64 rows need it; float32 stays
            version = getattr(module, "__version__", None)
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = version or importlib.metadata.version(name)
            out[name] = str(version or "installed")
    return out


def usable(version: str) -> bool:
    return version not in ("skipped", "not installed")


def torch_mlp(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> Callable:
    import torch

    ws = [torch.from_numpy(np.ascontiguousarray(w)) for w in weights]
    bs = [torch.from_numpy(np.ascontiguousarray(b)) for b in biases]

    def f(x):
        for w, b in zip(ws[:-1], bs[:-1], strict=True):
            x = torch.tanh(torch.nn.functional.linear(x, w, b))
        return torch.nn.functional.linear(x, ws[-1], bs[-1])

    return f


def jax_mlp(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> tuple[Callable, Any]:
    import jax
    import jax.numpy as jnp

    params = [(jax.device_put(w), jax.device_put(b)) for w, b in zip(weights, biases, strict=True)]

    def f(params, x):
        for w, b in params[:-1]:
            x = jnp.tanh(x @ w.T + b)
        w, b = params[-1]
        return x @ w.T + b

    return f, params


def autograd_mlp(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> Callable:
    import autograd.numpy as anp

    def f(x):
        for w, b in zip(weights[:-1], biases[:-1], strict=True):
            x = anp.tanh(anp.dot(x, w.T) + b)
        return anp.dot(x, weights[-1].T) + biases[-1]

    return f


def framework_mlp(
    name: str,
    mode: str,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    x: np.ndarray,
    vec: np.ndarray | None,
) -> tuple[str, Callable[[], Any], Callable[[Any], np.ndarray]] | None:
    """(label, thunk, result-to-NumPy) of the framework doing jacrun's work, or None if it has
    no such operation. ``vec`` holds one vector per sample (B, d)."""
    if name == "torch":
        import torch
        from torch.func import jacrev, jvp, vjp, vmap

        f = torch_mlp(weights, biases)
        xt = torch.from_numpy(x)
        if mode == "vjp":
            vt = torch.from_numpy(vec)

            def run_vjp():
                y, pullback = vjp(f, xt)
                return y, pullback(vt)[0]

            return "torch.func.vjp", run_vjp, lambda r: r[1].numpy()
        if mode == "jvp":
            tt = torch.from_numpy(vec)
            return "torch.func.jvp", lambda: jvp(f, (xt,), (tt,)), lambda r: r[1].numpy()
        jac = vmap(jacrev(f))
        return "torch vmap(jacrev)", lambda: jac(xt), lambda r: r.numpy()
    if name == "jax":
        import jax

        f, params = jax_mlp(weights, biases)
        xj = jax.device_put(x)
        if mode == "vjp":
            vj = jax.device_put(vec)

            @jax.jit
            def jax_vjp(params, x, v):
                y, pullback = jax.vjp(lambda x: f(params, x), x)
                return y, pullback(v)[0]

            run = lambda: jax.block_until_ready(jax_vjp(params, xj, vj))  # noqa: E731
            return "jax jit(vjp)", run, lambda r: np.asarray(r[1])
        if mode == "jvp":
            tj = jax.device_put(vec)
            jax_jvp = jax.jit(lambda params, x, t: jax.jvp(lambda x: f(params, x), (x,), (t,)))
            run = lambda: jax.block_until_ready(jax_jvp(params, xj, tj))  # noqa: E731
            return "jax jit(jvp)", run, lambda r: np.asarray(r[1])
        jac = jax.jit(lambda params, x: jax.vmap(jax.jacrev(lambda xi: f(params, xi)))(x))
        return "jax jit(vmap(jacrev))", lambda: jax.block_until_ready(jac(params, xj)), np.asarray
    if name == "autograd":
        from autograd import make_jvp, make_vjp

        f = autograd_mlp(weights, biases)
        if mode == "vjp":

            def run_vjp():
                pullback, y = make_vjp(f)(x)
                return y, pullback(vec)

            return "autograd make_vjp", run_vjp, lambda r: r[1]
        if mode == "jvp":
            return "autograd make_jvp", lambda: make_jvp(f)(x)(vec), lambda r: r[1]
        return None  # no vmap: a per-sample Jacobian means a Python loop over samples
    raise ValueError(name)


def framework_lorenz96(
    name: str, dim: int, forcing: float, dt: float, steps: int, x: np.ndarray, v: np.ndarray
) -> tuple[str, Callable[[], Any], Callable[[Any], np.ndarray]] | None:
    """The same RK4 integration written in the framework, and its reverse-mode VJP."""
    if name == "torch":
        import torch

        def rhs(s):
            return (torch.roll(s, -1, 1) - torch.roll(s, 2, 1)) * torch.roll(s, 1, 1) - s + forcing

        def flow(s):
            for _ in range(steps):
                k1 = rhs(s)
                k2 = rhs(s + dt / 2 * k1)
                k3 = rhs(s + dt / 2 * k2)
                k4 = rhs(s + dt * k3)
                s = s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            return s

        xt, vt = torch.from_numpy(x), torch.from_numpy(v)

        def run():
            xr = xt.detach().requires_grad_(True)
            y = flow(xr)
            return y.detach(), torch.autograd.grad(y, xr, vt)[0]

        return "torch autograd", run, lambda r: r[1].numpy()
    if name == "jax":
        import jax
        import jax.numpy as jnp

        def rhs_j(s):
            return (jnp.roll(s, -1, 1) - jnp.roll(s, 2, 1)) * jnp.roll(s, 1, 1) - s + forcing

        def step(s, _):
            k1 = rhs_j(s)
            k2 = rhs_j(s + dt / 2 * k1)
            k3 = rhs_j(s + dt / 2 * k2)
            k4 = rhs_j(s + dt * k3)
            return s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

        @jax.jit
        def jax_vjp(x, v):
            y, pullback = jax.vjp(lambda s: jax.lax.scan(step, s, None, length=steps)[0], x)
            return y, pullback(v)[0]

        xj, vj = jax.device_put(x), jax.device_put(v)
        return (
            "jax jit(vjp) of lax.scan",
            lambda: jax.block_until_ready(jax_vjp(xj, vj)),
            lambda r: np.asarray(r[1]),
        )
    return None


# ---- the kernel table ------------------------------------------------------------------------


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


def bench_mlp(
    shapes: Shapes, dtype: str, mode: str, frameworks: dict[str, str], log: Callable[[str], None]
) -> Row:
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


def bench_lorenz96(shapes: Shapes, dtype: str, frameworks: dict[str, str], log: Callable[[str], None]) -> Row:
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


# ---- end to end ------------------------------------------------------------------------------


class RssSampler:
    """Peak resident memory of some processes, sampled every ``interval`` seconds in a thread,
    and the CPU seconds they and this process used while it ran (``cpu``, on exit)."""

    def __init__(self, pids: Sequence[int], interval: float = 0.01) -> None:
        import psutil

        self.processes = [psutil.Process(pid) for pid in pids]
        self.interval = interval
        self.peak = {p.pid: 0 for p in self.processes}
        self.cpu = {"workers": 0.0, "this process": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu_now(self) -> dict[str, float]:
        import psutil

        def used(process: psutil.Process) -> float:
            try:
                times = process.cpu_times()
            except psutil.Error:  # a worker that died (its job is then reported as failed)
                return math.nan
            return times.user + times.system

        return {"workers": sum(map(used, self.processes)), "this process": used(psutil.Process())}

    def current(self) -> dict[int, int]:
        return {p.pid: p.memory_info().rss for p in self.processes}

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, rss in self.current().items():
                self.peak[pid] = max(self.peak[pid], rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._cpu_start = self._cpu_now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = {who: seconds - self._cpu_start[who] for who, seconds in self._cpu_now().items()}


def _warm_worker() -> int:
    """Import what a block imports, so the idle baseline includes the libraries."""
    import zarr  # noqa: F401

    import jacrun.block  # noqa: F401
    import jacrun.store  # noqa: F401

    return os.getpid()


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


def in_process_pipeline_rate(shapes: Shapes, samples: int, store: Path, blocks: int = 4) -> float:
    """Samples per second of whole blocks of the job (generate x and v, kernel, finiteness,
    write), run one after the other in this process with all BLAS threads: the same work as
    the cluster does, without Dask. Rewrites blocks of the finished store (idempotent)."""
    import jacrun
    from jacrun.block import BlockJob, run_block
    from jacrun.prepare import prepare

    config = jacrun.config_from_dict(e2e_config(shapes, samples, store, "tcp://127.0.0.1:1"))
    job = prepare(config, calibrate=False)
    block_job = BlockJob(
        config,
        job.config_hash,
        job.plan,
        job.inputs,
        job.vectors,
        str(store),
        blas_threads=os.cpu_count() or 1,
    )
    run_block(block_job, 0, 0)  # warm-up
    blocks = min(blocks, job.plan.grid[0] - 1)
    start = time.perf_counter()
    rows = sum(run_block(block_job, i, 0).rows for i in range(1, blocks + 1))
    return rows / (time.perf_counter() - start)


def block_breakdown(shapes: Shapes, samples: int, store: Path, reps: int) -> dict[str, float]:
    """Seconds of each step of block 0 of the job, in this process with 1 BLAS thread (as on
    a worker): what the end-to-end time is made of besides the kernel. The write rewrites
    block 0 of the finished store with the same bytes (blocks are idempotent)."""
    from threadpoolctl import threadpool_limits

    import jacrun
    from jacrun.block import nonfinite_count
    from jacrun.prepare import prepare
    from jacrun.store import write_block

    config = jacrun.config_from_dict(e2e_config(shapes, samples, store, "tcp://127.0.0.1:1"))
    job = prepare(config, calibrate=False)
    plan, f = job.plan, job.function
    (a, b), (k0, k1) = plan.block_rows(0), plan.block_vectors(0)
    out = np.dtype(config.output_dtype)
    x = job.inputs.read(a, b, f.dtype)
    v = job.vectors.read(a, b, k0, k1, f.dtype)
    y, result = f.vjp_batch(x, v)
    steps = {
        "inputs (random x)": lambda: job.inputs.read(a, b, f.dtype),
        "vectors (random v)": lambda: job.vectors.read(a, b, k0, k1, f.dtype),
        "kernel": lambda: f.vjp_batch(x, v),
        "finiteness check": lambda: [nonfinite_count(arr) for arr in (x, y, result)],
        "write (zstd, zarr)": lambda: write_block(
            str(store), plan, 0, 0, y.astype(out, copy=False), result.astype(out, copy=False)
        ),
    }
    with threadpool_limits(limits=1):
        return rounds(steps, reps, warmup=1)


COMPRESSIONS = ("zstd", "blosc", "none")


def codec_costs(shapes: Shapes, folder: Path, reps: int) -> dict[str, tuple[float, float]]:
    """compression -> (seconds to write one block of the job, stored bytes / raw bytes): the
    block's real results, written through ``write_block`` into a two-block store per codec,
    in this process with 1 BLAS thread (as on a worker)."""
    from threadpoolctl import threadpool_limits

    import jacrun
    from jacrun.prepare import prepare
    from jacrun.runner import open_output
    from jacrun.store import write_block

    costs = {}
    with threadpool_limits(limits=1):
        for compression in COMPRESSIONS:
            store = folder / f"codec-{compression}.zarr"
            spec = e2e_config(
                shapes, 2 * shapes.e2e_block, store, "tcp://127.0.0.1:1", compression=compression
            )
            job = open_output(prepare(jacrun.config_from_dict(spec), calibrate=False), overwrite=True)
            plan, f = job.plan, job.function
            (a, b), (k0, k1) = plan.block_rows(0), plan.block_vectors(0)
            y, result = f.vjp_batch(job.inputs.read(a, b, f.dtype), job.vectors.read(a, b, k0, k1, f.dtype))
            seconds = rounds(
                {"write": functools.partial(write_block, str(store), plan, 0, 0, y, result)}, reps, warmup=1
            )
            stored = sum(
                path.stat().st_size
                for name in (plan.result_name, "y")
                for path in (store / name).rglob("*")
                if path.is_file() and path.name != "zarr.json"
            )
            costs[compression] = (seconds["write"], stored / (y.nbytes + result.nbytes))
            shutil.rmtree(store, ignore_errors=True)
    return costs


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
    """Seconds of each step of one block in this process with 1 BLAS thread."""
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
    and once after (``jacobian_kernel_rate`` is their mean)."""
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

    @property
    def growth(self) -> float:
        return self.large.peak_increase / max(self.small.peak_increase, 1) - 1


Cluster = tuple[str, Callable[[], Sequence[int]], float]
"""(scheduler address, a callable that restarts the workers and returns their pids, seconds
the cluster took to start)."""


def measure_e2e(
    shapes: Shapes,
    cluster: Callable[[], contextlib.AbstractContextManager[Cluster]],
    log: Callable[[str], None],
) -> EndToEnd:
    """The cluster jobs (N, 8N, 8N with blosc and without compression, Jacobians), each on
    fresh workers, inside ``cluster()``; the in-process kernels before and after it, while no
    cluster runs (idle Dask workers and a scheduler in this process cost the kernel 3-5%, up
    to 15% right after a job: a baseline measured beside them flatters every ratio); then one
    block's steps, the in-process pipeline and the codecs, on the 8N job's store."""
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
        log("  in-process kernels, block steps, pipeline and codecs, after the cluster closed")
        kernel_rates += [vjp_rate(), vjp_rate()]
        jacobian_rates.append(jacobian_rate())
        store = folder / f"e2e-{large_n}.zarr"
        try:
            steps = block_breakdown(shapes, large_n, store, shapes.reps)
        except Exception as exc:  # noqa: BLE001 - jacrun internals another engineer may change
            steps = {f"unavailable ({type(exc).__name__}: {exc})": math.nan}
        pipeline = in_process_pipeline_rate(shapes, large_n, store)
        try:
            codecs = codec_costs(shapes, folder, shapes.reps)
        except Exception as exc:  # noqa: BLE001 - jacrun internals another engineer may change
            log(f"  codec costs unavailable ({type(exc).__name__}: {exc})")
            codecs = {}
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


def bench_e2e(shapes: Shapes, log: Callable[[str], None]) -> EndToEnd:
    """Measure on a LocalCluster of 2 worker processes x 1 thread, started for the jobs only."""

    @contextlib.contextmanager
    def local_cluster() -> Iterator[Cluster]:
        import logging

        from distributed import Client, LocalCluster

        from jacrun.cluster import local_worker_settings

        start = time.perf_counter()
        with (
            local_worker_settings(),  # the workers' environment, as jacrun's own local clusters
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                memory_limit="8GiB",
                silence_logs=logging.CRITICAL,
            ) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            client.run(_warm_worker)

            def fresh_workers() -> list[int]:
                client.restart()
                return list(client.run(_warm_worker).values())

            yield cluster.scheduler_address, fresh_workers, time.perf_counter() - start

    return measure_e2e(shapes, local_cluster, log)


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


def steps_table(seconds: dict[str, float]) -> list[str]:
    """Markdown rows: each step's time (ms) and share of one block, then the total."""
    total = sum(seconds.values())
    lines = ["| step | time | share |", "|---|---:|---:|"]
    lines += [f"| {step} | {value * 1e3:,.1f} ms | {value / total:.0%} |" for step, value in seconds.items()]
    return [*lines, f"| total | {total * 1e3:,.1f} ms | 100% |"]


def e2e_table(e2e: EndToEnd, shapes: Shapes) -> str:
    mib = 2**20
    lines = [
        f"MLP {'-'.join(map(str, shapes.e2e_sizes))} tanh, float32, vjp with 1 random cotangent per "
        "sample, random inputs, `save_outputs: true`, zstd; `jacrun.submit` on a LocalCluster of "
        f"2 worker processes x 1 thread (started once, {e2e.cluster_start:.1f} s, not counted; "
        "workers restarted before each job); memory: resident set of each worker sampled every "
        "10 ms, from its idle size after importing jacrun.",
        "",
        "| job | samples | blocks (rows each) | results | wall | samples/s | vs in-process kernel "
        "| worker idle RSS | peak RSS | peak - idle | projected per block | within projection |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, job in (("N", e2e.small), ("8N", e2e.large)):
        rate = job.samples / job.seconds
        lines.append(
            f"| {name}{'' if job.ok else ' (FAILED)'} | {job.samples:,} | "
            f"{job.blocks} ({job.rows_per_block:,}) | "
            f"{job.result_bytes / 1e9:.2f} GB | {job.seconds:.1f} s | {rate:,.0f} | "
            f"{rate / e2e.kernel_rate:.0%} | {job.idle_rss / mib:,.0f} MiB | {job.peak_rss / mib:,.0f} MiB | "
            f"{job.peak_increase / mib:,.0f} MiB | {job.projected / mib:,.0f} MiB | "
            f"{'yes' if job.peak_increase <= job.projected else 'NO'} |"
        )
    lines += [
        "",
        f"In-process kernel (same function, block of {e2e.large.rows_per_block:,} rows, this "
        f"process's BLAS threads, no cluster running): {e2e.kernel_rate:,.0f} samples/s"
        f"{_spread(e2e.kernel_rates)}. "
        "End to end (8N): "
        f"{e2e.rate:,.0f} samples/s = **{e2e.ratio:.0%}** of it ({e2e.ratio_with_start:.0%} counting the "
        f"cluster start). Peak worker memory above idle at 8N vs N: **{e2e.growth:+.1%}**.",
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
            "| vs in-process kernel | peak - idle | projected per block |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, job, kernel_rate in variants:
            if job is None:
                continue
            rate = job.samples / job.seconds
            lines.append(
                f"| {name}{'' if job.ok else ' (FAILED)'} | {job.samples:,} | "
                f"{job.blocks} ({job.rows_per_block:,}) | {job.result_bytes / 1e9:.2f} GB | "
                f"{job.seconds:.1f} s | {rate:,.0f} | {kernel_rate:,.0f} | **{rate / kernel_rate:.0%}** | "
                f"{job.peak_increase / mib:,.0f} MiB | {job.projected / mib:,.0f} MiB |"
            )
    if e2e.steps:
        lines += [
            "",
            f"Where one block's time goes ({e2e.large.rows_per_block:,} rows, in this process with "
            "1 BLAS thread, as on a worker):",
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
            f"Writing one such block ({raw / 1e6:.0f} MB of results) by `output.compression`, "
            "in this process with 1 BLAS thread:",
            "",
            "| compression | write | stored size |",
            "|---|---:|---:|",
        ]
        for name, (seconds, ratio) in e2e.codecs.items():
            lines.append(f"| {name} | {seconds * 1e3:,.1f} ms | {ratio:.1%} |")
    return "\n".join(lines)


# ---- environment -----------------------------------------------------------------------------


def blas_info() -> tuple[str, list[dict[str, Any]]]:
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


def _worker_settings() -> str:
    """What the benchmark's workers get from :func:`jacrun.cluster.local_worker_settings`."""
    import dask

    from jacrun.cluster import local_worker_settings

    with local_worker_settings():
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        profile = dask.config.get("distributed.worker.profile.interval")
        tick = dask.config.get("distributed.admin.tick.interval")
    tunables = (
        f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}, inherited from your environment"
        if "GLIBC_TUNABLES" in os.environ  # the nanny prefers the environment's value
        else f"GLIBC_TUNABLES={environ.get('GLIBC_TUNABLES', 'unset')}"
    )
    return f"{tunables}; Dask's profiler every {profile}, its event-loop tick every {tick}"


def environment(frameworks: dict[str, str]) -> str:
    import numpy

    lines = [
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
        f"- python {platform.python_version()}, numpy {numpy.__version__}; huge pages for large "
        f"arrays {_hugepages()} in this process; on the cluster's workers "
        + (
            "NumPy's default"
            if _USER_HUGEPAGE is None
            else f"NUMPY_MADVISE_HUGEPAGE={_USER_HUGEPAGE}, inherited from your environment"
        )
        + " (see the top of scripts/bench.py)",
        f"- the cluster's workers, as jacrun's local clusters set them: {_worker_settings()}",
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


# ---- targets ---------------------------------------------------------------------------------


def targets(rows: Sequence[Row], e2e: EndToEnd | None) -> str:
    """The issue's targets, each with the measured value and whether it is met."""
    out = ["| target | measured | met |", "|---|---|---|"]

    def add(what: str, value: float | None, goal: float, fmt: str = "{:.2f}x") -> None:
        if value is None:
            out.append(f"| {what} | not measured | - |")
        else:
            out.append(f"| {what} | {fmt.format(value)} | {'yes' if value >= goal else '**no**'} |")

    for row in rows:
        if row.kernel == "mlp vjp":
            add(f"mlp vjp {row.dtype} >= 90% of GEMM peak", row.peak_fraction, 0.9, "{:.0%}")
            add(f"mlp vjp {row.dtype} >= 1.2x torch.func.vjp", row.ratio("torch"), 1.2)
            add(f"mlp vjp {row.dtype} >= 1.1x jax jit(vjp)", row.ratio("jax"), 1.1)
        elif row.kernel == "mlp jacobian":
            add(f"mlp jacobian {row.dtype} >= 1.5x torch vmap(jacrev)", row.ratio("torch"), 1.5)
            add(f"mlp jacobian {row.dtype} >= 1.2x jax vmap(jacrev)", row.ratio("jax"), 1.2)
        elif row.kernel == "lorenz96 vjp":
            add(f"lorenz96 vjp {row.dtype} >= torch autograd", row.ratio("torch"), 1.0)
    if e2e is not None:
        add("end to end >= 90% of the in-process kernel (vjp, zstd)", e2e.ratio, 0.9, "{:.0%}")
        add("end to end >= 90% of the in-process kernel (vjp, blosc)", e2e.ratio_of(e2e.blosc), 0.9, "{:.0%}")
        add(
            "end to end >= 90% of the in-process kernel (vjp, no compression)",
            e2e.ratio_of(e2e.uncompressed),
            0.9,
            "{:.0%}",
        )
        add(
            "end to end >= 90% of the in-process kernel (Jacobians, zstd)",
            e2e.ratio_of(e2e.jacobian),
            0.9,
            "{:.0%}",
        )
        jobs = [
            (f"{e2e.small.samples:,} samples", e2e.small),
            (f"{e2e.large.samples:,} samples", e2e.large),
            ("8N, blosc", e2e.blosc),
            ("8N, no compression", e2e.uncompressed),
            ("Jacobians", e2e.jacobian),
        ]
        for name, job in jobs:
            if job is not None:
                add(
                    f"peak worker memory within projection ({name})",
                    job.projected / max(job.peak_increase, 1),
                    1.0,
                    "{:.2f}x headroom",
                )
        out.append(
            f"| peak worker memory < 10% higher at 8N than N | {e2e.growth:+.1%} | "
            f"{'yes' if e2e.growth < 0.1 else '**no**'} |"
        )
    return "\n".join(out)


# ---- bench_adapters --------------------------------------------------------------------------


def adapters_section(quick: bool, frameworks: Sequence[str]) -> str:
    path = Path(__file__).with_name("bench_adapters.py")
    if not path.exists():
        return "scripts/bench_adapters.py is not present."
    if not any(frameworks):
        return "Skipped (no frameworks requested)."
    try:
        sys.path.insert(0, str(path.parent))
        module = importlib.import_module("bench_adapters")
        options: dict[str, Any] = {"repeats": 2, "sizes": (32, 64, 64, 8)} if quick else {}
        rows = module.bench_adapters(256 if quick else 4096, **options)
        rows = [r for r in rows if r.get("adapter") in frameworks]
        return module.markdown(rows) if rows else "No adapter ran (no framework installed)."
    except Exception as exc:  # noqa: BLE001 - another engineer's script: report, do not fail
        return f"bench_adapters failed: {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path.parent))


# ---- main ------------------------------------------------------------------------------------


def run(
    quick: bool = False,
    skip_e2e: bool = False,
    frameworks: Sequence[str] = FRAMEWORKS,
    reps: int | None = None,
    only: str | None = None,
    skip_adapters: bool = False,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
    skip_kernels: bool = False,
) -> str:
    """Run the benchmark and return its report (markdown). ``only`` keeps the kernel rows whose
    name contains it (``"mlp vjp"``, ``"lorenz96"``); ``skip_kernels`` drops them all."""
    shapes = QUICK if quick else FULL
    if reps is not None:
        shapes = dataclasses.replace(shapes, reps=reps)
    load = os.getloadavg()[0]
    versions = available(frameworks)
    env = environment(versions)  # before the cluster (whose workers' settings leak into os.environ)
    blas_table, blas = blas_info()
    kernel = ", ".join(f"{p['internal_api']} {p['version']} {p.get('architecture', '')}" for p in blas)
    log(f"BLAS: {kernel or 'unknown'}")
    rows: list[Row] = []
    log("kernels:")
    modes = ("vjp", "jvp", "jacobian")
    cases = [(f"mlp {mode}", dtype) for dtype in ("float32", "float64") for mode in modes]
    cases += [("lorenz96 vjp", "float64"), ("lorenz96 vjp", "float32")]
    for name, dtype in cases:
        if skip_kernels or (only and only not in name):
            continue
        if name.startswith("mlp"):
            rows.append(bench_mlp(shapes, dtype, name.split()[1], versions, log))
        else:
            rows.append(bench_lorenz96(shapes, dtype, versions, log))
    e2e = None
    if not skip_e2e:
        log("end to end:")
        e2e = bench_e2e(shapes, log)
    adapters = "Skipped (--skip-adapters)."
    if not skip_adapters:
        log("adapters:")
        adapters = adapters_section(quick, [name for name, version in versions.items() if usable(version)])
    sections = [
        f"# jacrun benchmark{' (--quick: smoke test, not a measurement)' if quick else ''}",
        "",
        f"BLAS in use: **{kernel or 'unknown'}**",
        "",
        env,
        f"- load average (1 min) when the run started: {load:.2f}, when it ended: "
        f"{os.getloadavg()[0]:.2f} (other processes on the cores slow every contender, "
        "small GEMMs on 2 BLAS threads most)",
        "",
        "## Kernels (in process)",
        "",
        "Median of rounds that run every contender once; `% of GEMM peak` against a "
        f"{shapes.gemm}x{shapes.gemm} `np.matmul` timed in the same rounds (GFLOP/s after 'of'). "
        "`vs X` is X's time / jacrun's time: above 1, jacrun is faster. One vector per sample for "
        "vjp/jvp; Jacobians by reverse mode over the output basis. FLOPs: the matrix products "
        "the work needs (forward pass and one pass per vector; lorenz96: the cost model's "
        "elementwise count).",
        "",
        kernel_table(rows) if not skip_kernels else "Skipped (--skip-kernels).",
        "",
        "## End to end and memory",
        "",
        e2e_table(e2e, shapes) if e2e else "Skipped (--skip-e2e).",
        "",
        "## Targets",
        "",
        targets(rows, e2e),
        "",
        "## BLAS (threadpoolctl.threadpool_info())",
        "",
        blas_table,
        "",
        "## Autodiff adapters (scripts/bench_adapters.py)",
        "",
        adapters,
        "",
    ]
    return "\n".join(sections)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, seconds (a smoke test)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the cluster jobs")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help="comma-separated frameworks to compare (torch,jax,autograd), or 'none'",
    )
    parser.add_argument("--reps", type=int, help="timed rounds per row (default 7, --quick 3)")
    parser.add_argument("--only", help="kernel rows whose name contains this (e.g. 'mlp vjp')")
    parser.add_argument("--skip-adapters", action="store_true", help="skip scripts/bench_adapters.py")
    parser.add_argument(
        "--skip-kernels", action="store_true", help="skip the in-process kernel rows (cluster jobs only)"
    )
    args = parser.parse_args(argv)
    frameworks = (
        [] if args.frameworks == "none" else [f.strip() for f in args.frameworks.split(",") if f.strip()]
    )
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        parser.error(f"unknown frameworks: {', '.join(sorted(unknown))}")
    report = run(
        args.quick,
        args.skip_e2e,
        frameworks,
        args.reps,
        args.only,
        args.skip_adapters,
        skip_kernels=args.skip_kernels,
    )
    print(report)
    if args.output:
        args.output.write_text(report)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
