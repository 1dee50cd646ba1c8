"""Throughput of jacrun's autodiff adapters against each framework's own batched VJP.

For every installed framework (torch, jax, autograd) and dtype, one block of an MLP
(default 256-512-512-64, tanh) is differentiated two ways on the same inputs:

- **jacrun**: the adapter's ``vjp_batch(x, v)`` as a block runs it, NumPy in and NumPy out
  (conversions included), built from the examples' targets through ``kind: python``;
- **framework**: what a user would write in the framework itself on its own arrays:
  ``torch.func.vmap`` of a per-sample ``vjp`` whose pullback is vmapped over the vectors;
  ``jax.jit(jax.vmap(...))`` of the same; autograd's ``make_vjp`` of the batched function,
  applied to each vector.

Each is timed ``repeats`` times, alternating, and the best time counts (robust to a busy
machine). Throughput is VJPs per second (batch x vectors / seconds); ``ratio`` is jacrun's over
the framework's (target: >= 0.8).

Run: ``python scripts/bench_adapters.py [--batch 4096] [--vectors 4]`` prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jacrun.functions import adapters, build_function

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SIZES = (256, 512, 512, 64)


def _sections(sizes: Sequence[int]) -> dict[str, dict[str, Any]]:
    """The examples' MLPs (the weights of ``kind: mlp`` with seed 0) as adapter sections."""
    params = {"sizes": list(sizes), "activation": "tanh", "seed": 0}
    return {
        "torch": {"target": "torch_mlp:MLP", "path": str(EXAMPLES / "torch_mlp"), "params": params},
        "jax": {
            "target": "jax_mlp:mlp",
            "path": str(EXAMPLES / "jax_fn"),
            "params": params,
            "n_in": sizes[0],
        },
        "autograd": {
            "target": "autograd_mlp:mlp",
            "path": str(EXAMPLES / "autograd_fn"),
            "params": params,
            "n_in": sizes[0],
            "batched": True,
        },
    }


def _framework_vjp(
    backend: str, f: adapters.AutodiffFunction, x: np.ndarray, v: np.ndarray
) -> Callable[[], Any]:
    """The framework's own batched VJP of the same function on its own arrays, as a thunk."""
    fn = f.fn
    if backend == "torch":
        import torch

        xt, vt = torch.from_numpy(x.copy()), torch.from_numpy(v.copy())

        def one(xi: torch.Tensor, vi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y, pullback = torch.func.vjp(fn, xi)
            return y, torch.func.vmap(pullback)(vi)[0]

        batched = torch.func.vmap(one)
        return lambda: batched(xt, vt)
    if backend == "jax":
        import jax

        def one_jax(xi: jax.Array, vi: jax.Array) -> tuple[jax.Array, jax.Array]:
            y, pullback = jax.vjp(fn, xi)
            return y, jax.vmap(pullback)(vi)[0]

        compiled = jax.jit(jax.vmap(one_jax))
        xj, vj = jax.device_put(x), jax.device_put(v)
        return lambda: jax.block_until_ready(compiled(xj, vj))
    from autograd.core import make_vjp

    def run() -> tuple[np.ndarray, np.ndarray]:
        pullback, y = make_vjp(fn, x)
        return y, np.stack([pullback(v[:, k]) for k in range(v.shape[1])], axis=1)

    return run


def _best(thunks: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Best wall time of each thunk over ``repeats`` alternating rounds (after one warm-up each)."""
    for thunk in thunks:
        thunk()
    best = [float("inf")] * len(thunks)
    for _ in range(repeats):
        for i, thunk in enumerate(thunks):
            start = time.perf_counter()
            thunk()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def bench_adapters(
    batch: int = 4096,
    *,
    sizes: Sequence[int] = SIZES,
    vectors: int = 4,
    dtypes: Sequence[str] = ("float64", "float32"),
    repeats: int = 5,
    backends: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per installed adapter and dtype: {adapter, dtype, jacrun_per_s, framework_per_s, ratio}.

    Throughputs are VJPs per second on one block of ``batch`` samples x ``vectors`` cotangents.
    """
    rows = []
    rng = np.random.default_rng(0)
    sections = _sections(sizes)
    # fd differentiates no framework's function: scripts/bench.py's fd section compares it with SciPy
    for backend in backends or [name for name in adapters.BACKENDS if name != "fd"]:
        if not adapters.available(backend):
            continue
        for dtype in dtypes:
            spec = {"kind": "python", "autodiff": backend, "dtype": dtype, **sections[backend]}
            f = build_function(spec)
            assert isinstance(f, adapters.AutodiffFunction)
            x = rng.standard_normal((batch, f.n_in)).astype(dtype)
            v = rng.standard_normal((batch, vectors, f.n_out)).astype(dtype)
            framework = _framework_vjp(backend, f, x, v)
            jacrun_s, framework_s = _best([lambda f=f, x=x, v=v: f.vjp_batch(x, v), framework], repeats)
            products = batch * vectors
            rows.append(
                {
                    "adapter": backend,
                    "dtype": dtype,
                    "jacrun_per_s": products / jacrun_s,
                    "framework_per_s": products / framework_s,
                    "ratio": framework_s / jacrun_s,
                }
            )
    return rows


def markdown(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """The rows as a markdown table."""
    lines = [title, ""] if title else []
    lines += ["| adapter | dtype | jacrun VJPs/s | framework VJPs/s | ratio |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['adapter']} | {row['dtype']} | {row['jacrun_per_s']:,.0f} | "
            f"{row['framework_per_s']:,.0f} | {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4096, help="samples per block")
    parser.add_argument("--vectors", type=int, default=4, help="cotangents per sample (K)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="MLP layer widths")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the best counts")
    args = parser.parse_args()
    rows = bench_adapters(args.batch, sizes=args.sizes, vectors=args.vectors, repeats=args.repeats)
    sizes = "-".join(map(str, args.sizes))
    print(markdown(rows, f"VJP throughput, MLP {sizes} tanh, batch {args.batch}, {args.vectors} vectors"))


if __name__ == "__main__":
    main()
