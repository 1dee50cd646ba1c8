"""The activation table of the ``mlp`` kind: name -> (function, derivative), HIPS-autograd style.

Every entry is two tiny ufunc pipelines that write into a caller-supplied buffer, so the MLP
kernels control (and the cost model can count) every temporary:

- ``fn(z, out)``: the activation a = sigma(z) of the pre-activation ``z``, written into ``out``;
  ``out`` is a fresh buffer or ``z`` itself (in place).
- ``deriv(z, a, out)``: sigma'(z), from ``z`` and/or ``a = sigma(z)``, whichever is cheaper
  (tanh and sigmoid reuse ``a``; softplus reads ``a`` because exp(-a) = 1 - sigmoid(z));
  ``out`` may be ``z`` (the MLP overwrites the pre-activation with the derivative), never ``a``.

``scratch`` counts the temporaries of ``deriv`` (arrays of z's shape) and ``flops`` the
elementwise operations per element of ``fn`` plus ``deriv``; both feed the MLP cost model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np

ActivationName = Literal["tanh", "relu", "sigmoid", "softplus", "gelu", "sin", "identity"]


class Activation(NamedTuple):
    """One row of the table."""

    fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
    deriv: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    scratch: int = 0
    flops: int = 2


# ---- tanh: tanh'(z) = 1 - a^2 -------------------------------------------------------------


def _tanh(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.tanh(z, out=out)


def _tanh_deriv(z: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.multiply(a, a, out=out)
    return np.subtract(1, out, out=out)


# ---- relu: relu'(z) = [z > 0], so relu'(0) = 0 (as in PyTorch) -----------------------------


def _relu(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0, out=out)


def _relu_deriv(z: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.greater(z, 0, out=out)


# ---- sigmoid: 1/2 (1 + tanh(z/2)) never overflows; sigmoid'(z) = a (1 - a) ------------------


def _sigmoid(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


def _sigmoid_deriv(z: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.subtract(1, a, out=out)
    out *= a
    return out


# ---- softplus: log(1 + e^z) via logaddexp; softplus'(z) = sigmoid(z) = 1 - e^(-a) -----------


def _softplus(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.logaddexp(0, z, out=out)


def _softplus_deriv(z: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    # -expm1(-a) keeps full relative accuracy where sigmoid(z) is tiny (z << 0).
    np.negative(a, out=out)
    np.expm1(out, out=out)
    return np.negative(out, out=out)


# ---- gelu, tanh approximation (PyTorch GELU(approximate="tanh")) ----------------------------
# a = z/2 (1 + tanh(u)), u = c (z + k z^3), c = sqrt(2/pi), k = 0.044715
# a' = (1 + th) (1/2 + s (1 - th)), th = tanh(u), s = c/2 z (1 + 3 k z^2)

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def _gelu(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    u = np.multiply(z, z) if out is z else np.multiply(z, z, out=out)
    u *= _GELU_K
    u += 1
    u *= z
    u *= _GELU_C
    np.tanh(u, out=u)
    u += 1
    np.multiply(u, z, out=out)
    out *= 0.5
    return out


def _gelu_deriv(z: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    s = np.multiply(z, z)
    th = np.multiply(s, _GELU_K)
    th += 1
    th *= z
    th *= _GELU_C
    np.tanh(th, out=th)
    s *= 3 * _GELU_K
    s += 1
    s *= z
    s *= 0.5 * _GELU_C  # z is no longer read: out may be z from here on
    np.subtract(1, th, out=out)
    out *= s
    out += 0.5
    th += 1
    out *= th
    return out


# ---- sin, identity -------------------------------------------------------------------------


def _sin(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.sin(z, out=out)


def _sin_deriv(z: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.cos(z, out=out)


def _identity(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    if out is not z:
        np.copyto(out, z)
    return out


def _identity_deriv(z: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    out.fill(1)
    return out


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(_tanh, _tanh_deriv, scratch=0, flops=3),
    "relu": Activation(_relu, _relu_deriv, scratch=0, flops=2),
    "sigmoid": Activation(_sigmoid, _sigmoid_deriv, scratch=0, flops=6),
    "softplus": Activation(_softplus, _softplus_deriv, scratch=0, flops=4),
    "gelu": Activation(_gelu, _gelu_deriv, scratch=2, flops=22),
    "sin": Activation(_sin, _sin_deriv, scratch=0, flops=2),
    "identity": Activation(_identity, _identity_deriv, scratch=0, flops=0),
}
"""name -> Activation(fn, deriv, scratch, flops)."""


def activation(name: str) -> Activation:
    """Look up an activation by name, with the known names in the error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        known = ", ".join(ACTIVATIONS)
        raise ValueError(f"unknown activation {name!r}; known: {known}") from None
