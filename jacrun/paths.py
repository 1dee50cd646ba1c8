"""Path types for config models: relative paths resolve against the config file's folder.

The folder arrives through pydantic's validation context as ``{"base_dir": Path}``;
without a context, paths resolve against the current working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ValidationInfo


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


def _resolve(value: Path, info: ValidationInfo) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = _base_dir(info) / path
    return path.resolve()


def _resolve_existing(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    return path


OutputPath = Annotated[Path, AfterValidator(_resolve)]
"""A path that may not exist yet (an output store)."""

InputPath = Annotated[Path, AfterValidator(_resolve_existing)]
"""A path that must exist when the config is loaded (weights, input arrays)."""


def _location(value: Any, info: ValidationInfo, *, existing: bool) -> str | Path:
    """A URL stays a string (checked: a known scheme, no credentials); ``file://`` URLs and
    paths become resolved local paths."""
    from jacrun.location import check_url, is_url

    text = str(value)
    if text.startswith("file://"):
        value = text[len("file://") :]
    elif is_url(text):
        return check_url(text)
    return (_resolve_existing if existing else _resolve)(Path(value), info)


OutputLocation = Annotated[
    str | Path, BeforeValidator(lambda value, info: _location(value, info, existing=False))
]
"""An output store: a local path (may not exist yet) or an fsspec URL (``s3://bucket/job.zarr``)."""

InputLocation = Annotated[
    str | Path, BeforeValidator(lambda value, info: _location(value, info, existing=True))
]
"""An input Zarr store: an existing local path or an fsspec URL."""
