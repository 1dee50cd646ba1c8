"""A NumPy function for ``autodiff: autograd``, written for a batch (``batched: true``).

autograd has no vmap, so f maps a batch x (B, n) -> (B, m) with independent rows (no sums or
means over axis 0): jacrun checks that at build time. Use ``autograd.numpy`` in place of
``numpy`` inside f. ``mlp`` is a factory (annotated to return a callable), called once per
worker with the config's params; without ``weights`` it draws the weights of jacrun's built-in
``kind: mlp`` with the same sizes and seed.
"""

from __future__ import annotations

from collections.abc import Callable

import autograd.numpy as anp
import numpy as np

from jacrun.functions.mlp import glorot_weights

ACTIVATIONS = {"tanh": anp.tanh, "sin": anp.sin, "relu": lambda z: anp.maximum(z, 0.0)}


def mlp(
    sizes: list[int] | None = None,
    activation: str = "tanh",
    seed: int = 0,
    weights: str | None = None,
    dtype: str = "float64",
) -> Callable[[np.ndarray], np.ndarray]:
    """f(X) = a(X W_0^T + b_0) ... W_L^T + b_L, row by row."""
    if weights is not None:
        with np.load(weights) as data:
            count = len(data.files) // 2
            ws, bs = [data[f"W{i}"] for i in range(count)], [data[f"b{i}"] for i in range(count)]
    elif sizes is not None:
        ws, bs = glorot_weights(sizes, seed)
    else:
        raise ValueError("give sizes (random weights) or weights (an .npz of W0, b0, ...)")
    # rows are samples: x @ W^T, with W^T stored contiguous once
    layers = [
        (np.ascontiguousarray(w.T, dtype=dtype), np.asarray(b, dtype=dtype))
        for w, b in zip(ws, bs, strict=True)
    ]
    act = ACTIVATIONS[activation]

    def f(x: np.ndarray) -> np.ndarray:
        for wt, b in layers[:-1]:
            x = act(x @ wt + b)
        wt, b = layers[-1]
        return x @ wt + b

    return f
