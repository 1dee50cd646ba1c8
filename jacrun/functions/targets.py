"""Target resolution for ``kind: python``: ``package.module:attr`` imported and looked up, unchecked.

What a target may be is decided by its users: :mod:`jacrun.functions.python` (a Function
subclass or factory) and :mod:`jacrun.functions.adapters` (a plain function for an autodiff
framework). Both use this module; it imports neither, so they do not import each other.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import threading
import typing
from pathlib import Path
from typing import Any

from jacrun.errors import ConfigError
from jacrun.functions.base import Function

TARGET_PATTERN = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"
"""``package.module:attr``: a dotted module path, a colon, one attribute name."""

_PATH_LOCK = threading.Lock()


class TargetError(ConfigError, ValueError):
    """A ``kind: python`` target that cannot be imported, is not accepted, or fails to build.

    A :class:`~jacrun.errors.ConfigError` (the CLI exits 2) and a ``ValueError``.
    """


def return_annotation(target: str, function: Any, advice: str) -> Any:
    """The return annotation of the target's ``function`` (None if absent); TargetError naming
    the target, followed by ``advice``, when its annotations cannot be resolved."""
    try:
        return typing.get_type_hints(function).get("return")
    except Exception as exc:
        raise TargetError(
            f"target {target!r}: the annotations of {function.__qualname__} cannot be resolved "
            f"({type(exc).__name__}: {exc}); {advice}"
        ) from exc


def resolve_target(target: str, path: Path | str | None = None) -> Any:
    """Import ``package.module:attr`` (``path`` first on sys.path) and return the object, unchecked.

    Callers decide what they accept; nothing here calls the object.
    """
    return _resolve_target(target, None if path is None else str(Path(path).resolve()))


def clear_cache() -> None:
    """Forget the resolved targets (modules stay in sys.modules, as with any import)."""
    _resolve_target.cache_clear()


@functools.lru_cache(maxsize=256)
def _resolve_target(target: str, path: str | None) -> Any:
    if not re.fullmatch(TARGET_PATTERN, target):
        raise TargetError(f"target {target!r} must look like 'package.module:attr'")
    module_name, _, attr = target.partition(":")
    if path is not None:
        _prepend_path(path)
    module = _import(module_name, target, path)
    if path is not None:
        _check_origin(module_name, target, path)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TargetError(
            f"target {target!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
            f"has no attribute {attr!r}"
        ) from None


def _prepend_path(path: str) -> None:
    with _PATH_LOCK:
        if path not in sys.path:
            sys.path.insert(0, path)


def _import(module_name: str, target: str, path: str | None) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            where = f"in {path} or on sys.path" if path else "on sys.path"
            hint = "" if path else "; set `path:` to the folder that holds the package"
            raise TargetError(f"target {target!r}: no module named {missing!r} {where}{hint}") from None
        raise TargetError(f"target {target!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise TargetError(
            f"target {target!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _check_origin(module_name: str, target: str, path: str) -> None:
    """Refuse a module of the same name already imported from elsewhere than ``path``.

    A long-lived worker keeps its modules: a second job whose ``path`` holds another package
    of the same name would silently get the first one.
    """
    top = module_name.split(".")[0]
    base = Path(path)
    if not ((base / top).is_dir() or (base / f"{top}.py").is_file()):
        return  # path does not provide this package; it was meant to come from elsewhere
    module = sys.modules.get(top)
    locations = list(getattr(module, "__path__", None) or [getattr(module, "__file__", None)])
    found = [Path(loc).resolve() for loc in locations if loc]
    if found and not any(loc.is_relative_to(base) for loc in found):
        raise TargetError(
            f"target {target!r}: module {top!r} is already imported from {found[0]}, not from "
            f"{base}; a Python process holds one module of a name (rename the package, or "
            "restart the workers)"
        )


def describe(obj: Any) -> str:
    """How a refused target is named in errors: what it is, and what to name instead."""
    if isinstance(obj, Function):
        return f"a Function instance ({type(obj).__name__}); name its class or a factory instead"
    if inspect.isbuiltin(obj):
        return f"the built-in function {getattr(obj, '__name__', obj)!r}"
    if callable(obj):
        return f"a callable {type(obj).__name__} object"
    return f"a value of type {type(obj).__name__}"


def signature_of(target: Any) -> inspect.Signature | None:
    """``inspect.signature`` of a class or function; None when it has none (some built-ins)."""
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def accepts(signature: inspect.Signature | None, name: str) -> bool:
    """Whether ``signature`` has a parameter ``name`` that can be passed by keyword."""
    if signature is None or name not in signature.parameters:
        return False
    kind = signature.parameters[name].kind
    return kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
