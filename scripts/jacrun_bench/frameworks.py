"""The kernels' work written in torch, jax and HIPS autograd, as a user of each would write it."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

FRAMEWORKS = ("torch", "jax", "autograd")


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
