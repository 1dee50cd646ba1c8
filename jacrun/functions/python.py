"""``kind: python``: a user's Function, imported from ``package.module:attr``.

Without ``autodiff``, only two kinds of target are ever called: a subclass of
:class:`jacrun.functions.Function` (instantiated as ``cls(**params)``) or a factory function whose
return annotation is such a subclass (called as ``factory(**params)``). Anything else at the
target, such as ``numpy:sin``, ``os:system``, a module or a constant, is refused before
anything is called, so a config can name a function but cannot make jacrun call an arbitrary
callable. Importing the module does run its top-level code, as any ``import`` does: a config
that names a module trusts it.

With ``autodiff: torch | jax | autograd | fd`` the target is a plain function f(x) -> y (or a
torch ``nn.Module`` subclass, or a factory annotated to return a callable) that an adapter of
:mod:`jacrun.functions.adapters` differentiates (``fd``: by finite differences, options under
``fd:``); those rules are in that package.
"""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PositiveInt,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from jacrun.functions.base import Function, FunctionSpec
from jacrun.functions.registry import register
from jacrun.functions.targets import (
    TARGET_PATTERN,
    TargetError,
    accepts,
    clear_cache,  # noqa: F401 - re-exported: tests and workers forget targets through this module
    describe,
    resolve_target,
    return_annotation,
    signature_of,
)
from jacrun.paths import InputPath

ACCEPTED = (
    "kind: python accepts only a jacrun.functions.Function subclass, or a factory function "
    "whose return annotation is a Function subclass"
)

ADAPTER_KEYS = ("batched", "n_in", "n_out", "weights", "threads", "width")
"""Keys of the section that only apply with ``autodiff``."""

Bound = float | list[float | None] | None
"""One side of ``fd.bounds``: a number for every input, one number per input, or null (none)."""


class FDOptions(BaseModel):
    """``fd:`` of an ``autodiff: fd`` section: how finite differences are taken."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["forward", "central", "complex"] = Field(
        "forward",
        description=(
            "forward: (f(x + h t) - f(x)) / h, one evaluation per direction; central: "
            "(f(x + h t) - f(x - h t)) / 2h, two; complex: Im f(x + i h t) / h, one, exact to "
            "rounding for f written with complex-safe operations."
        ),
    )
    step: Literal["auto"] | Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        "auto",
        description=(
            "relative step r: h_j = r * max(1, |x_j|) per input; auto: sqrt(eps) forward, "
            "eps**(1/3) central, eps complex (eps of the compute dtype)."
        ),
    )
    bounds: tuple[Bound, Bound] | None = Field(
        None,
        description=(
            "[lower, upper]: the domain of f, each side a number, a list of n numbers or null; "
            "steps never leave it (one-sided near a bound)."
        ),
    )
    call_memory: ByteSize = Field(
        ByteSize(1 << 20),
        description=(
            "perturbed inputs and outputs per call of f (cache-sized by default); raise it for an "
            "f with a large cost per call, such as a Python loop over time steps."
        ),
    )

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, value: tuple[Bound, Bound] | None) -> tuple[Bound, Bound] | None:
        if value is None:
            return None
        for name, given in zip(("lower", "upper"), value, strict=True):
            if isinstance(given, list) and not given:
                raise ValueError(f"the {name} bounds are an empty list")
            if any(v is not None and v != v for v in (given if isinstance(given, list) else [given])):
                raise ValueError(f"the {name} bounds contain NaN")
        if isinstance(value[0], list) and isinstance(value[1], list) and len(value[0]) != len(value[1]):
            raise ValueError(f"lower has {len(value[0])} values and upper {len(value[1])}")
        from jacrun.functions.adapters.fd import bound_array

        lower, upper = np.broadcast_arrays(bound_array(value[0], -np.inf), bound_array(value[1], np.inf))
        bad = np.flatnonzero(~(lower < upper))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"input {j}: lower bound {lower[j]:g} is not below upper bound {upper[j]:g}")
        return value

    @field_validator("call_memory")
    @classmethod
    def _positive(cls, value: ByteSize) -> ByteSize:
        if value <= 0:
            raise ValueError("must be positive, e.g. 1MiB")
        return value


class PythonSpec(FunctionSpec):
    """Config of ``kind: python``."""

    kind: Literal["python"] = "python"
    target: str = Field(
        description=(
            "`package.module:attr` naming a jacrun Function subclass, or a factory function "
            "whose return annotation is one."
        ),
        json_schema_extra={"pattern": f"^{TARGET_PATTERN}$"},
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Keyword arguments of the class or factory, passed verbatim (paths in them are "
            "not resolved). `dtype` is passed from the section's own `dtype` when accepted."
        ),
    )
    path: InputPath | None = Field(
        default=None,
        description=(
            "A folder put first on sys.path before importing, relative to the config file, "
            "so every worker finds a package that lives next to the config."
        ),
    )
    autodiff: Literal["torch", "jax", "autograd", "fd"] | None = Field(
        default=None,
        description=(
            "Differentiate a plain function f(x) -> y with this framework, or by finite "
            "differences (fd; see docs/writing-functions.md, Autodiff adapters); absent: the "
            "target is a Function."
        ),
    )
    fd: FDOptions | None = Field(
        default=None,
        description=(
            "autodiff: fd only: a section of method (forward | central | complex), step (auto or "
            "a relative step), bounds ([lower, upper]) and call_memory (1MiB)."
        ),
    )
    batched: bool = Field(
        default=False,
        description=(
            "autodiff only: f maps a batch (B, n) -> (B, m) with independent rows (probed at "
            "build time); false: f maps one sample (n,) -> (m,). autograd needs true."
        ),
    )
    n_in: PositiveInt | None = Field(
        default=None,
        description=(
            "autodiff only: the length n of one sample; default the width of inputs read from a "
            "file (npy, zarr), else the callable's `n_in` attribute."
        ),
    )
    n_out: PositiveInt | None = Field(
        default=None,
        description="autodiff only: the length m of f(x), checked; default inferred from f(zeros).",
    )
    weights: InputPath | None = Field(
        default=None,
        description=(
            "autodiff only: a file, relative to the config; passed as `weights=` (a path) to a "
            "target that has that parameter, else (torch) loaded as the nn.Module's state dict."
        ),
    )
    threads: PositiveInt | None = Field(
        default=None,
        description=(
            "autodiff: torch only: torch.set_num_threads; default the BLAS thread count "
            "jacrun uses in the process (on workers 1 per worker thread by default)."
        ),
    )
    width: PositiveInt | None = Field(
        default=None,
        description=(
            "autodiff only: the widest intermediate per sample, for the planner's memory "
            "model; default max(n_in, n_out) or a torch module's largest parameter dimension."
        ),
    )

    @field_validator("target")
    @classmethod
    def _target_shape(cls, value: str) -> str:
        if not re.fullmatch(TARGET_PATTERN, value):
            raise ValueError(
                f"target {value!r} must look like 'package.module:attr' "
                "(a dotted module path, a colon, one attribute name)"
            )
        return value

    @field_validator("params")
    @classmethod
    def _no_dtype_param(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "dtype" in value:
            raise ValueError("set `dtype` on the function section, not in `params`")
        return value

    @field_validator("path")
    @classmethod
    def _path_is_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"path must be a folder to import from, got the file {value}")
        return value

    @field_validator("autodiff")
    @classmethod
    def _backend_installed(cls, value: str | None) -> str | None:
        from jacrun.functions import adapters

        if value is not None and not adapters.available(value):
            raise ValueError(adapters.missing_message(value))
        return value

    @field_validator("fd")
    @classmethod
    def _fd_only_for_fd(cls, value: FDOptions | None, info: ValidationInfo) -> FDOptions | None:
        autodiff = info.data.get("autodiff", "fd")  # absent: autodiff itself failed validation
        if value is not None and autodiff != "fd":
            now = "the section has no autodiff" if autodiff is None else f"not autodiff: {autodiff}"
            raise ValueError(f"only applies with `autodiff: fd` (finite differences), {now}; remove it")
        return value

    @model_validator(mode="after")
    def _autodiff_keys(self) -> PythonSpec:
        if self.autodiff is None:
            extra = [key for key in ADAPTER_KEYS if key in self.model_fields_set]
            if extra:
                raise ValueError(
                    f"{', '.join(extra)} only apply with `autodiff: torch | jax | autograd` (a "
                    "plain function differentiated by a framework); a Function target sets its "
                    "own sizes"
                )
            return self
        if self.autodiff == "autograd" and not self.batched:
            raise ValueError(
                "autodiff: autograd needs `batched: true` (autograd has no vmap): write f for a "
                "batch, x (B, n) -> y (B, m), with independent rows"
            )
        if self.threads is not None and self.autodiff != "torch":
            raise ValueError("threads applies to autodiff: torch only")
        if self.weights is not None and "weights" in self.params:
            raise ValueError("give weights once: as the section's `weights` or in `params`, not both")
        return self

    @model_serializer(mode="wrap")
    def _without_unused_adapter_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A section without ``autodiff`` serialises (and hashes) as before adapters existed,
        and one without ``fd`` as before finite differences existed."""
        data = handler(self)
        if isinstance(data, dict):
            if self.autodiff is None:
                for key in ("autodiff", *ADAPTER_KEYS):
                    data.pop(key, None)
            if self.fd is None:
                data.pop("fd", None)
        return data


@register
class PythonFunction(Function):
    """The registry entry of ``kind: python``: abstract, ``from_spec`` builds the user's Function."""

    kind = "python"
    description = (
        "Your own Function subclass or factory, imported from `package.module:attr`; with "
        "`autodiff`, a plain function f(x) differentiated by torch, jax or autograd, or by "
        "finite differences (fd)."
    )
    spec_model = PythonSpec

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> Function:
        """Import ``spec.target``, check it is accepted, and call it with ``spec.params``."""
        if not isinstance(spec, PythonSpec):
            raise TypeError(f"expected a PythonSpec, got {type(spec).__name__}")
        if spec.autodiff is not None:
            from jacrun.functions import adapters

            return adapters.build(spec)
        target = load_target(spec.target, spec.path)
        kwargs = dict(spec.params)
        signature = signature_of(target)
        takes_dtype = accepts(signature, "dtype")
        if takes_dtype:
            kwargs["dtype"] = np.dtype(spec.dtype)
        if signature is not None:
            try:
                signature.bind(**kwargs)
            except TypeError as exc:
                raise TargetError(
                    f"target {spec.target!r} does not accept params {spec.params!r}: {exc}; "
                    f"its signature is {spec.target.partition(':')[2]}{signature}"
                ) from None
        try:
            built = target(**kwargs)
        except Exception as exc:
            raise TargetError(
                f"building target {spec.target!r} with params {spec.params!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return _validated(built, spec, takes_dtype)


def load_target(
    target: str, path: Path | str | None = None
) -> type[Function] | typing.Callable[..., Function]:
    """Import ``package.module:attr`` (``path`` first on sys.path) and return it if accepted.

    The import and lookup are cached per (target, path), so each worker imports a target
    once; failures are not cached. Raises :class:`TargetError` unless the object is a
    Function subclass or an annotated factory.
    """
    obj = resolve_target(target, path)
    _check_accepted(obj, target)
    return obj


def _check_accepted(obj: Any, target: str) -> None:
    """Refuse everything but a concrete Function subclass or an annotated factory function."""
    if inspect.ismodule(obj):
        raise TargetError(f"target {target!r} is a module; {ACCEPTED}")
    if isinstance(obj, type):
        if not issubclass(obj, Function):
            raise TargetError(
                f"target {target!r} is the class {obj.__qualname__}, which is not a Function "
                f"subclass; {ACCEPTED}"
            )
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
            raise TargetError(
                f"target {target!r} is the abstract class {obj.__qualname__}: implement {missing}"
            )
        return
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        returns = return_annotation(target, obj, ACCEPTED)
        if isinstance(returns, type) and issubclass(returns, Function):
            return
        shown = "no return annotation" if returns is None else f"return annotation {returns!r}"
        raise TargetError(f"target {target!r} is the function {obj.__qualname__} with {shown}; {ACCEPTED}")
    raise TargetError(f"target {target!r} is {describe(obj)}, not a class or factory; {ACCEPTED}")


def _validated(built: Any, spec: PythonSpec, takes_dtype: bool) -> Function:
    """Check what the target built: a Function with positive sizes in the config's dtype."""
    target = spec.target
    if not isinstance(built, Function):
        raise TargetError(f"target {target!r} returned {type(built).__name__}, not a jacrun Function")
    for name in ("n_in", "n_out"):
        value = getattr(built, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise TargetError(
                f"target {target!r} built {type(built).__name__} with {name} = {value!r}; "
                "it must be a positive int"
            )
    raw = getattr(built, "dtype", None)
    try:
        dtype = None if raw is None else np.dtype(raw)
    except TypeError:
        dtype = None
    if dtype is None:
        raise TargetError(
            f"target {target!r} built {type(built).__name__} with dtype {raw!r}; "
            "set self.dtype to np.dtype('float32') or np.dtype('float64')"
        )
    if dtype != np.dtype(spec.dtype):
        hint = (
            ""
            if takes_dtype
            else "; accept a `dtype` parameter (jacrun passes the section's "
            "dtype) or set the section's dtype to match"
        )
        raise TargetError(f"target {target!r} computes in {dtype} but the config asks for {spec.dtype}{hint}")
    if not isinstance(raw, np.dtype):
        built.dtype = dtype  # normalise np.float64 (a type) or "float64" to the np.dtype
    return built
