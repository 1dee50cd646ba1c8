"""The registry of function kinds: a flat table from ``kind`` to a Function class."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from jacrun.functions.base import Function, FunctionSpec

_REGISTRY: dict[str, type[Function]] = {}


def register(cls: type[Function]) -> type[Function]:
    """Class decorator: make ``cls`` available as ``kind: cls.kind`` in configs."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a non-empty `kind`")
    if "kind" not in cls.spec_model.model_fields:
        raise ValueError(f"{cls.__name__}.spec_model needs a `kind` field")
    _REGISTRY[cls.kind] = cls
    return cls


def kinds() -> dict[str, type[Function]]:
    """Every registered kind, sorted by name."""
    return dict(sorted(_REGISTRY.items()))


def function_class(kind: str) -> type[Function]:
    try:
        return _REGISTRY[kind]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown function kind {kind!r}; known kinds: {known}") from None


def parse_spec(raw: Mapping[str, Any] | FunctionSpec, base_dir: Path | None = None) -> FunctionSpec:
    """Validate a ``function`` config section into the spec model of its kind.

    Raises ``pydantic.ValidationError`` with locations relative to the section.
    """
    if isinstance(raw, FunctionSpec):
        return raw
    if not isinstance(raw, Mapping):
        raise TypeError("the function section must be a mapping")
    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise ValueError("the function section needs `kind`: " + ", ".join(sorted(_REGISTRY)))
    model = function_class(kind).spec_model
    context = {"base_dir": base_dir} if base_dir else None
    return TypeAdapter(model).validate_python(dict(raw), context=context)


def build_function(spec: Mapping[str, Any] | FunctionSpec, base_dir: Path | None = None) -> Function:
    """Build a Function from a config section (a dict or a validated spec)."""
    spec = parse_spec(spec, base_dir)
    return function_class(spec.kind).from_spec(spec)
