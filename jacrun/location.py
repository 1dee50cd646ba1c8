"""Where a store lives: a local path or a URL, and the Zarr store object that reaches it.

A location is a ``str`` or ``Path``. Local paths (and ``file://`` URLs) open as Zarr's
LocalStore; other URLs go through fsspec (see :func:`zarr_store`).
"""

from __future__ import annotations

from pathlib import Path

from zarr.abc.store import Store
from zarr.core.sync import sync

Location = str | Path
"""A store's location: a local path, or a URL such as ``s3://bucket/job.zarr``."""


def is_url(location: Location) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in str(location)


def local_path(location: Location) -> Path | None:
    """The local path of ``location`` (a path or a ``file://`` URL), None for a remote URL."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    return None if is_url(text) else Path(text)


def zarr_store(location: Location, *, read_only: bool = False) -> Store:
    """A Zarr store at ``location``."""
    from zarr.storage import LocalStore

    path = local_path(location)
    if path is None:
        raise NotImplementedError(f"{location}: remote stores are not supported")
    return LocalStore(str(path), read_only=read_only)


def get_bytes(store: Store, key: str) -> bytes | None:
    """The object at ``key`` in ``store``, or None if absent."""
    from zarr.core.buffer import default_buffer_prototype

    value = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if value is None else value.to_bytes()


def set_bytes(store: Store, key: str, data: bytes) -> None:
    """Write ``data`` as the whole object ``key``."""
    from zarr.core.buffer import default_buffer_prototype

    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def delete(store: Store, key: str) -> None:
    """Delete the object ``key`` (nothing if absent)."""
    sync(store.delete(key))


def exists(store: Store, key: str) -> bool:
    return bool(sync(store.exists(key)))


def label(location: Location) -> str:
    """``location`` for messages: a path or URL, never options or credentials."""
    return str(location)
