"""A PyTorch MLP for ``autodiff: torch``: jacrun differentiates it with torch.func.

``MLP(sizes, activation, seed)`` draws the weights of jacrun's built-in ``kind: mlp`` with the
same ``sizes`` and ``seed`` (Glorot-scaled normal weights, layer by layer), so the two give
the same Jacobians. A ``weights:`` file in the config (a ``torch.save``'d state dict, or an .npz
of the same keys, ``layers.0.weight``, ``layers.0.bias``, ...) replaces them.
"""

from __future__ import annotations

import torch
from torch import nn

from jacrun.functions.mlp import glorot_weights

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "identity": nn.Identity}


class MLP(nn.Module):
    """Dense layers ``sizes = [n, h1, ..., m]``, ``activation`` between them, none after the last."""

    def __init__(self, sizes: list[int], activation: str = "tanh", seed: int = 0) -> None:
        super().__init__()
        self.n_in = sizes[0]  # jacrun reads n_in from here when the config does not give it
        # float64 layers hold the float64 draws exactly; jacrun then moves the module to the
        # config's dtype
        self.layers = nn.ModuleList(
            nn.Linear(a, b, dtype=torch.float64) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.activation = ACTIVATIONS[activation]()
        weights, biases = glorot_weights(sizes, seed)
        with torch.no_grad():
            for layer, w, b in zip(self.layers, weights, biases, strict=True):
                layer.weight.copy_(torch.from_numpy(w))
                layer.bias.copy_(torch.from_numpy(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.layers
        for layer in hidden:
            x = self.activation(layer(x))
        return last(x)
