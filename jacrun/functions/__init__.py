"""Function kernels: the protocol, the registry and the built-in kinds.

Importing this package registers every built-in kind.
"""

from jacrun.functions import bratu, linear, lorenz96, mlp, python, rosenbrock  # noqa: F401  (register)
from jacrun.functions.base import Function, FunctionSpec, basis_vectors, resolve_strategy
from jacrun.functions.registry import build_function, function_class, kinds, parse_spec, register

__all__ = [
    "Function",
    "FunctionSpec",
    "basis_vectors",
    "build_function",
    "function_class",
    "kinds",
    "parse_spec",
    "register",
    "resolve_strategy",
]
