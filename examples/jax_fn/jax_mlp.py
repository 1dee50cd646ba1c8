"""A JAX function for ``autodiff: jax``: jacrun differentiates it with jax.vjp/jvp under vmap.

``mlp`` is a factory (its return annotation says it returns a callable): jacrun calls it once
per worker with the config's params and dtype, and differentiates the function it returns,
f(x) for one sample x (n,) -> (m,). Without ``weights`` it draws the weights of jacrun's
built-in ``kind: mlp`` with the same sizes and seed; ``weights:`` in the config names an .npz
of ``W0, b0, W1, b1, ...`` (W_i of shape (out, in), torch.nn.Linear layout), passed here as a path.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jacrun.functions.mlp import glorot_weights

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "sin": jnp.sin}


def mlp(
    sizes: list[int] | None = None,
    activation: str = "tanh",
    seed: int = 0,
    weights: str | None = None,
    dtype: str = "float64",
) -> Callable[[jax.Array], jax.Array]:
    """f(x) = W_L a(... a(W_0 x + b_0) ...) + b_L for one sample x."""
    if weights is not None:
        with np.load(weights) as data:
            count = len(data.files) // 2
            ws, bs = [data[f"W{i}"] for i in range(count)], [data[f"b{i}"] for i in range(count)]
    elif sizes is not None:
        ws, bs = glorot_weights(sizes, seed)
    else:
        raise ValueError("give sizes (random weights) or weights (an .npz of W0, b0, ...)")
    layers = [(jnp.asarray(w, dtype=dtype), jnp.asarray(b, dtype=dtype)) for w, b in zip(ws, bs, strict=True)]
    act = ACTIVATIONS[activation]

    def f(x: jax.Array) -> jax.Array:
        for w, b in layers[:-1]:
            x = act(w @ x + b)
        w, b = layers[-1]
        return w @ x + b

    return f
