"""Autodiff adapters: a plain function f(x) -> y, differentiated by PyTorch, JAX, autograd or
finite differences.

``kind: python`` with ``autodiff: torch | jax | autograd | fd`` builds an
:class:`AutodiffFunction` from one module of this package (``torch.py``, ``jax.py``,
``autograd.py``, ``fd.py``), imported only when a config names it, so jacrun itself never needs
the frameworks.

What the target may be (nothing is called before these checks):

- **a function** ``f(x) -> y`` defined with ``def`` (or a lambda, or such a function wrapped by
  ``jax.jit`` or ``functools.wraps``): of one sample, x (n,) -> y (m,), or with
  ``batched: true`` of a batch, x (B, n) -> y (B, m). It is only ever called on arrays (tensors,
  tracers) inside the adapter, never with ``params``;
- **a factory**: such a function whose return annotation is a callable type
  (``Callable[...]``, or with torch an ``nn.Module`` subclass). It is called once per build
  with ``params`` (plus ``dtype=`` and ``weights=`` when it has those parameters) and returns f;
- **with torch, an ``nn.Module`` subclass**, instantiated with ``params``.

Refused: built-in functions and ufuncs, classes other than ``nn.Module`` subclasses, modules,
instances, jacrun Functions (they have their own kernels) and functions of the Python
standard library. The factory rule mirrors the Function kind's: a config can only make jacrun
call, with arguments it chooses, something that declares itself a builder of functions.

Building then infers or checks the sizes (``n_in`` from the section, the inputs' file or an
``n_in`` attribute; ``n_out`` from one forward call on zeros), checks the dtype of f's output,
probes a ``batched`` f for coupling between rows, and runs one tiny VJP and JVP, so that a
function the framework cannot differentiate fails as a :class:`~jacrun.functions.targets.TargetError`
(a ConfigError, exit 2) before any cluster starts.

A backend module provides ``setup``, ``factory_dtype``, ``prepare``, ``default_width``,
``TARGET_CLASSES`` and ``Adapter``; optionally ``adapter_options(spec)`` (more keyword
arguments of ``Adapter``) and ``probe_derivatives(function, target, label)`` in place of the
tiny VJP and JVP (``fd`` probes one JVP and, for the complex step, f on complex inputs).
"""

from __future__ import annotations

import collections.abc
import importlib
import importlib.util
import inspect
import sys
import threading
import typing
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from jacrun.functions.base import Function, Mode
from jacrun.functions.targets import (
    TargetError,
    accepts,
    describe,
    resolve_target,
    return_annotation,
    signature_of,
)

if TYPE_CHECKING:
    from types import ModuleType

    from jacrun.functions.python import PythonSpec
    from jacrun.sparsity import SparseJacobian

Fused = Callable[[np.ndarray, bool, "np.ndarray | None"], tuple[Any, np.ndarray]]
"""A backend's fused sparse kernel for one colouring: (x (B, n), outputs, out) -> (y or None,
nonzeros (B, nnz), in ``out`` when given)."""

_FUSED_LOCK = threading.Lock()

Role = Literal["function", "factory", "class"]


@dataclass(frozen=True)
class Backend:
    """One framework: the name in configs, the package it imports and the extra that installs it."""

    name: str
    package: str
    label: str

    @property
    def install(self) -> str:
        return f"pip install 'jacrun[{self.name}]'"


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "torch", "PyTorch"),
    "jax": Backend("jax", "jax", "JAX"),
    "autograd": Backend("autograd", "autograd", "autograd"),
    "fd": Backend("fd", "numpy", "finite differences"),
}
"""``autodiff`` values: each adapter is ``jacrun.functions.adapters.<name>``."""

PROBE_ROWS = 4
"""Rows of the row-independence probe of a ``batched`` function."""


def available(name: str) -> bool:
    """Whether the framework of ``name`` can be imported here (without importing it)."""
    package = BACKENDS[name].package
    if package in sys.modules:
        return sys.modules[package] is not None  # None: an import that is known to fail
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def missing_message(name: str) -> str:
    """What to run when the framework of ``autodiff: name`` is missing."""
    backend = BACKENDS[name]
    return (
        f"autodiff: {name} needs {backend.label}, which is not installed in this Python "
        f"environment ({sys.executable}); install it with: {backend.install}"
    )


# ---- hooks shared by the NumPy-array backends (jax, autograd); torch has its own ----------


def numpy_factory_dtype(dtype: np.dtype) -> np.dtype:
    """What a factory's ``dtype`` parameter receives: the NumPy dtype."""
    return np.dtype(dtype)


def weights_unsupported(
    fn: Callable[..., Any], *, dtype: np.dtype, weights: Path | None
) -> Callable[..., Any]:
    """A ``weights`` file is only for targets that take it (or for torch modules)."""
    if weights is not None:
        raise TargetError("weights: the target has no `weights` parameter to receive the file")
    return fn


def no_width_hint(fn: Any) -> int | None:
    """No widest-layer hint for the planner's memory estimate."""
    return None


def no_options(spec: PythonSpec) -> dict[str, Any]:
    """No adapter options beyond the section's common keys (``fd`` has some: ``adapter_options``)."""
    return {}


def load_backend(name: str) -> ModuleType:
    """Import the adapter module of ``name`` (and so its framework); TargetError if that fails."""
    if name not in BACKENDS:
        raise TargetError(f"unknown autodiff {name!r}; known: {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        raise TargetError(f"{missing_message(name)} (importing it failed: {exc})") from None


def blas_threads() -> int:
    """Threads of NumPy's BLAS in this process now: what jacrun's own kernels use here.

    On a worker, the block runner limits BLAS (threadpoolctl) before it builds the function,
    and Dask starts workers with OMP/MKL/OPENBLAS_NUM_THREADS=1, so this is jacrun's per-thread
    count (1 per worker thread by default); in an interactive process, the BLAS default.
    """
    try:
        from threadpoolctl import threadpool_info

        counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    except Exception:  # pragma: no cover - threadpoolctl is a dependency; be safe anyway
        counts = []
    return max(counts, default=1)


class AutodiffFunction(Function):
    """A Function whose kernels come from a framework's vjp/jvp of a plain function.

    Subclasses (one per framework) implement ``_compile`` (turn ``self.fn`` into batched
    callables) and the three kernels. ``fn`` maps one sample (n,) -> (m,) or, when
    ``batched``, a batch (B, n) -> (B, m); ``scalar`` marks an f that returns a scalar per
    sample, seen as m = 1.
    """

    kind = "python"
    backend: ClassVar[str] = ""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        n_in: int,
        dtype: np.dtype,
        batched: bool,
        scalar: bool = False,
        n_out: int = 0,
        target: str = "",
        width: int | None = None,
    ) -> None:
        self.fn = fn
        self.n_in = n_in
        self.n_out = n_out
        self.dtype = np.dtype(dtype)
        self.batched = batched
        self.scalar = scalar
        self.target = target
        self.width = width
        self._compile()

    @abstractmethod
    def _compile(self) -> None:
        """Prepare the batched forward, vjp and jvp callables of ``self.fn``."""

    def _vector_fn(self) -> Callable[..., Any]:
        """``self.fn``, with a scalar output per sample reshaped to a vector of length 1."""
        fn = self.fn
        if not self.scalar:
            return fn
        shape = (-1, 1) if self.batched else (1,)
        return lambda x: fn(x).reshape(shape)

    def probe_inputs(self, rows: int, seed: int | None) -> np.ndarray:
        """Rows (rows, n) at which the build probes f: zeros (``seed`` None), else standard
        normal draws; ``fd`` keeps them inside ``fd.bounds``, f's domain."""
        if seed is None:
            return np.zeros((rows, self.n_in), dtype=self.dtype)
        return np.random.default_rng(seed).standard_normal((rows, self.n_in)).astype(self.dtype)

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """An estimate: frameworks keep the forward pass's intermediates and a few per vector."""
        width = max(self.n_in, self.n_out, self.width or 0)
        return 8 * batch * (k + 1) * width * self.dtype.itemsize

    # ---- sparse Jacobians: one fused computation per block ----------------------------------

    fuses: ClassVar[bool] = False
    """Whether the backend has a fused sparse path (:meth:`_fuse`)."""

    def _fuse(self, sparse: SparseJacobian) -> Fused:
        """The backend's kernel for ``sparse``: the products of all colours and the gather."""
        raise NotImplementedError

    def fused_nonzeros(
        self, x: np.ndarray, sparse: SparseJacobian, out: np.ndarray | None = None, outputs: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray] | None:
        """The block in framework computations of :meth:`fused_rows` rows each: ``jvp`` (fwd)
        or ``vjp`` (rev) of f for every colour's seed and the gather by the index map together."""
        if not self.fuses:
            return None
        return self._fused_kernel(sparse)(x, outputs, out)

    def fused_work_bytes(self, sparse: SparseJacobian, rows: int) -> int | None:
        """x as the framework's array; per framework call (:meth:`fused_rows`) the compressed
        products (rows, C, w), their gathered nonzeros and y before they are copied out, and the
        framework's work for C vectors (:meth:`work_bytes`); kept: the seeds and the index map,
        NumPy's and the framework's copies, and the row of every nonzero."""
        if not self.fuses:
            return None
        item, colours = self.dtype.itemsize, sparse.n_colours
        mode: Mode = "jvp" if sparse.direction == "fwd" else "vjp"
        span = self.fused_memory_rows(sparse, rows)
        call = span * (colours * sparse.product_width + sparse.nnz + self.n_out) * item
        kept = 2 * colours * sparse.width * item + 3 * sparse.nnz * 8
        return rows * self.n_in * item + call + self.work_bytes(span, colours, mode) + kept

    def fused_rows(self, sparse: SparseJacobian, rows: int) -> int:
        """Rows per framework call of the fused path on a block of ``rows``: all of them."""
        return rows

    def fused_memory_rows(self, sparse: SparseJacobian, rows: int) -> int:
        """Rows of one call as :meth:`fused_work_bytes` counts it: :meth:`fused_rows`."""
        return self.fused_rows(sparse, rows)

    def _fused_kernel(self, sparse: SparseJacobian) -> Fused:
        """The kernel of ``sparse``'s colouring, built once per colouring (the last one kept)."""
        cached = self.__dict__.get("_fused")
        if cached is not None and cached[0] is sparse:
            return cached[2]
        key = (sparse.digest, sparse.direction, sparse.colours.tobytes())
        with _FUSED_LOCK:
            cached = self.__dict__.get("_fused")
            if cached is None or cached[1] != key:
                self.__dict__.pop("_fused", None)  # the last colouring's arrays go first
                cached = (sparse, key, self._fuse(sparse))
            self.__dict__["_fused"] = (sparse, key, cached[2])
        return cached[2]

    def __repr__(self) -> str:
        shape = "batched" if self.batched else "per sample"
        return (
            f"{type(self).__name__}({self.target!r}, n_in={self.n_in}, n_out={self.n_out}, "
            f"dtype={self.dtype}, {shape})"
        )


# ---- building -------------------------------------------------------------------------------


def build(spec: PythonSpec) -> AutodiffFunction:
    """Import, check, build and probe the target of an ``autodiff`` section."""
    assert spec.autodiff is not None
    backend = load_backend(spec.autodiff)
    dtype = np.dtype(spec.dtype)
    backend.setup(dtype=dtype, threads=spec.threads)
    target = spec.target
    obj = resolve_target(target, spec.path)
    role = classify(obj, target, spec.autodiff, backend.TARGET_CLASSES)
    weights = spec.weights
    if role == "function":
        if spec.params:
            raise TargetError(
                f"target {target!r} is a plain function f(x), which takes no params "
                f"(got {sorted(spec.params)}); to build f from params, write a factory annotated "
                "to return a callable, e.g. `def make(...) -> Callable:`"
            )
        fn: Any = obj
    else:
        fn, weights = _call_factory(obj, spec, role, backend.factory_dtype(dtype))
    if not callable(fn):
        raise TargetError(f"target {target!r} returned {describe(fn)}, not a callable f(x)")
    try:
        fn = backend.prepare(fn, dtype=dtype, weights=weights)
    except Exception as exc:
        what = "" if isinstance(exc, TargetError) else f"{type(exc).__name__}: "
        raise TargetError(f"target {target!r}: {what}{exc}") from exc
    n_in = _input_size(fn, spec)
    width = spec.width or backend.default_width(fn)
    options = {"n_in": n_in, "dtype": dtype, "batched": spec.batched, "target": target, "width": width}
    options.update(getattr(backend, "adapter_options", no_options)(spec))
    function = backend.Adapter(fn, **options)
    m, scalar = _output_size(function, spec)
    if scalar:
        function = backend.Adapter(fn, scalar=True, **options)
    function.n_out = m
    if spec.batched:
        _probe_rows(function, target)
    probe = getattr(backend, "probe_derivatives", _probe_derivatives)
    probe(function, target, BACKENDS[spec.autodiff].label)
    return function


def classify(obj: Any, target: str, autodiff: str, classes: tuple[type, ...]) -> Role:
    """What the target is, decided without calling it; TargetError for anything refused."""
    accepted = (
        f"autodiff: {autodiff} accepts a function f(x) defined with def, a factory function "
        "annotated to return a callable (`-> Callable`"
        + (", `-> nn.Module`)" if classes else ")")
        + (", or an nn.Module subclass" if classes else "")
    )
    if inspect.ismodule(obj):
        raise TargetError(f"target {target!r} is a module; {accepted}")
    if isinstance(obj, type):
        if issubclass(obj, Function):
            raise TargetError(
                f"target {target!r} is the jacrun Function {obj.__qualname__}, which has its own "
                "kernels: remove `autodiff` from the section"
            )
        if classes and issubclass(obj, classes):
            if inspect.isabstract(obj):
                raise TargetError(f"target {target!r} is the abstract class {obj.__qualname__}")
            return "class"
        raise TargetError(f"target {target!r} is the class {obj.__qualname__}; {accepted}")
    if isinstance(obj, np.ufunc) or inspect.isbuiltin(obj):
        raise TargetError(f"target {target!r} is {describe(obj)}; {accepted}")
    try:
        function = inspect.unwrap(obj) if callable(obj) else obj
    except ValueError:
        function = obj
    if not inspect.isfunction(function):
        hint = "; name its class or a factory instead" if classes and isinstance(obj, classes) else ""
        raise TargetError(f"target {target!r} is {describe(obj)}{hint}; {accepted}")
    module = (getattr(function, "__module__", None) or "").partition(".")[0]
    if module in getattr(sys, "stdlib_module_names", ()):
        raise TargetError(
            f"target {target!r} is a function of the Python standard library ({module}); {accepted}"
        )
    returns = return_annotation(target, function, "import the names they use in its module")
    return "factory" if _is_callable_type(returns, classes) else "function"


def _is_callable_type(annotation: Any, classes: tuple[type, ...]) -> bool:
    """``Callable``, ``Callable[...]`` (typing or collections.abc), or a subclass of ``classes``."""
    if annotation is None:
        return False
    if annotation in (collections.abc.Callable, typing.Callable):
        return True
    if typing.get_origin(annotation) is collections.abc.Callable:
        return True
    return bool(classes) and isinstance(annotation, type) and issubclass(annotation, classes)


def _call_factory(obj: Any, spec: PythonSpec, role: Role, dtype: Any) -> tuple[Any, Any]:
    """Call a factory or class with params (+ dtype, weights when accepted); returns (f, weights left).

    ``dtype`` is the framework's own dtype object (``torch.float64``; NumPy's for the others).
    """
    target = spec.target
    kwargs = dict(spec.params)
    signature = signature_of(obj)
    if accepts(signature, "dtype"):
        kwargs["dtype"] = dtype
    weights = spec.weights
    if weights is not None and accepts(signature, "weights"):
        kwargs["weights"] = str(weights)
        weights = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise TargetError(
                f"target {target!r} does not accept params {spec.params!r}: {exc}; "
                f"its signature is {target.partition(':')[2]}{signature}"
            ) from None
    what = "instantiating" if role == "class" else "calling the factory"
    try:
        return obj(**kwargs), weights
    except Exception as exc:
        raise TargetError(
            f"{what} {target!r} with params {spec.params!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _input_size(fn: Any, spec: PythonSpec) -> int:
    """n: the section's ``n_in`` (which :func:`jacrun.prepare.build` takes from inputs in a file
    when the section has none), else the callable's ``n_in`` attribute; given both, they agree."""
    value = getattr(fn, "n_in", None)
    declared = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0
    if spec.n_in is not None:
        if declared and value != spec.n_in:
            raise TargetError(
                f"target {spec.target!r}: the callable's n_in attribute is {value}, but the job's "
                f"n_in is {spec.n_in} (the section's n_in, else the width of the inputs)"
            )
        return spec.n_in
    if declared:
        return int(value)
    raise TargetError(
        f"target {spec.target!r}: set `n_in:` in the function section (the length n of one sample "
        "x), or read the inputs from an .npy or Zarr file, whose width gives it; it cannot be "
        "inferred (the callable has no positive int attribute `n_in`)"
    )


def _output_size(function: AutodiffFunction, spec: PythonSpec) -> tuple[int, bool]:
    """(m, scalar) from one forward call on zeros (inside ``fd.bounds``); check its shape,
    dtype and ``n_out``."""
    target, n = spec.target, function.n_in
    rows = 2
    shape = (rows, n) if spec.batched else (n,)
    x = function.probe_inputs(rows, None)
    try:
        y = function.forward_batch(x)
    except Exception as exc:
        raise TargetError(
            f"target {target!r}: calling f on {'a point inside fd.bounds' if x.any() else 'zeros'} "
            f"of shape {shape} failed: "
            f"{type(exc).__name__}: {exc}"
            + ("" if spec.n_in is None else " (is n_in right?)")
            + ("" if spec.batched else "; if f expects a batch (B, n), set `batched: true`")
        ) from exc
    y = np.asarray(y)
    expected = f"(B, {spec.n_out or 'm'})" if spec.batched else f"({spec.n_out or 'm'},)"
    if y.ndim == 0 or y.shape[0] != rows or y.ndim > 2:
        got = y.shape if spec.batched else y.shape[1:]
        raise TargetError(
            f"target {target!r}: f of x with shape {shape} returned shape {got}; it must return "
            f"{expected}" + ("" if spec.batched else " per sample (a vector)")
        )
    scalar = y.ndim == 1
    m = 1 if scalar else y.shape[1]
    if spec.n_out is not None and m != spec.n_out:
        raise TargetError(
            f"target {target!r}: f returns {m} values per sample (shape {y.shape[1:]} for one "
            f"{'row' if spec.batched else 'sample'}), but n_out is {spec.n_out}"
        )
    if y.dtype != function.dtype:
        raise TargetError(
            f"target {target!r}: f returns {y.dtype} for {function.dtype} inputs, but the config "
            f"computes in {spec.dtype}; build f in that dtype (a factory with a `dtype` "
            "parameter receives it) or set the section's dtype to match"
        )
    return m, scalar


def _probe_rows(function: AutodiffFunction, target: str) -> None:
    """A batched f must not couple rows: perturbing row 0 moves no other row, and f of a
    sub-batch gives the same rows as f of the whole batch."""
    x = function.probe_inputs(PROBE_ROWS, 0)
    moved = x.copy()
    moved[0] = function.probe_inputs(1, 1)[0]
    try:
        y = _f64(function.forward_batch(x))
        y_moved = _f64(function.forward_batch(moved))
        y_sub = _f64(function.forward_batch(np.ascontiguousarray(x[1:3])))
    except Exception as exc:
        raise TargetError(
            f"target {target!r}: calling f on a batch of {PROBE_ROWS} random rows failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    scale = max(float(np.nanmax(np.abs(y), initial=0.0)), 1.0)
    tolerance = 1e3 * float(np.finfo(function.dtype).eps) * scale
    leak = _difference(y_moved[1:], y[1:])
    if leak > tolerance:
        raise TargetError(
            f"target {target!r} couples samples: changing row 0 of a batch of {PROBE_ROWS} "
            f"changed the other rows of f by up to {leak:.3g}; jacrun needs row b of f(x) to "
            "depend on row b of x only (no batch statistics, no normalisation over axis 0)"
        )
    subset = _difference(y_sub, y[1:3])
    if subset > tolerance:
        raise TargetError(
            f"target {target!r} couples samples: f of rows 1:3 alone differs from rows 1:3 of f "
            f"of the whole batch by up to {subset:.3g}; the output must not depend on the "
            "batch it comes in"
        )


def _probe_derivatives(function: AutodiffFunction, target: str, label: str) -> None:
    """One VJP and one JVP on two rows: fail now, not on a worker, if f cannot be differentiated."""
    rng = np.random.default_rng(1)
    n, m, dtype = function.n_in, function.n_out, function.dtype
    x = rng.standard_normal((2, n)).astype(dtype)
    calls = {
        "vjp": (lambda: function.vjp_batch(x, rng.standard_normal((2, 1, m)).astype(dtype)), n),
        "jvp": (lambda: function.jvp_batch(x, rng.standard_normal((2, 1, n)).astype(dtype)), m),
    }
    for name, (call, width) in calls.items():
        try:
            y, out = call()
        except Exception as exc:
            raise TargetError(
                f"target {target!r}: {label} cannot compute the {name} of f: {type(exc).__name__}: {exc}"
            ) from exc
        if y.shape != (2, m) or out.shape != (2, 1, width) or out.dtype != dtype:
            raise TargetError(
                f"target {target!r}: the {name} of f has shape {out.shape} ({out.dtype}), "
                f"expected {(2, 1, width)} ({dtype})"
            )


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|, counting NaN against NaN as equal and NaN against a number as infinite."""
    both = np.isnan(a) & np.isnan(b)
    diff = np.where(both, 0.0, np.abs(a - b))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))
