"""Where a store lives: a local path or an fsspec URL, and the Zarr store object that reaches it.

A location is a ``str`` or ``Path``. Local paths open as Zarr's LocalStore (jacrun.store
adds write-behind for blocks); URLs (``s3://``, ``gs://``, ``az://``, ``memory://``, ...)
open as Zarr's FsspecStore, with the ``storage_options`` registered for that URL in this
process (:func:`register`). Options never leave this module in a message: errors name the
URL only, which may not carry credentials (:func:`check_url`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zarr.abc.store import Store
from zarr.core.sync import sync

from jacrun.errors import ConfigError

Location = str | Path
"""A store's location: a local path, or a URL such as ``s3://bucket/job.zarr``."""

EXTRAS = {"s3": "jacrun[s3] (s3fs)", "s3a": "jacrun[s3] (s3fs)", "gs": "gcsfs", "gcs": "gcsfs"}
EXTRAS.update(dict.fromkeys(("az", "abfs", "abfss", "adl"), "adlfs"))
"""What to install for a scheme whose fsspec implementation is missing."""

_OPTIONS: dict[str, dict[str, Any]] = {}
"""storage_options per URL, for this process (see :func:`register`)."""


def is_url(location: Location) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in str(location)


def local_path(location: Location) -> Path | None:
    """The local path of ``location`` (a path or a ``file://`` URL), None for a remote URL."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    return None if is_url(text) else Path(text)


def check_url(url: str) -> str:
    """``url`` without a trailing slash; ValueError (one line, no secret) if it carries
    credentials or its scheme has no installed fsspec implementation."""
    import fsspec

    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError(
            "credentials do not belong in the URL: use the environment, a profile or storage_options"
        )
    if not parts.netloc and parts.scheme not in ("memory",):
        raise ValueError(f"{url}: no bucket or host in the URL")
    try:
        fsspec.get_filesystem_class(parts.scheme)
    except ImportError:
        extra = EXTRAS.get(parts.scheme, f"the fsspec implementation of {parts.scheme}://")
        raise ValueError(f"{parts.scheme}:// needs an fsspec implementation: install {extra}") from None
    except ValueError:
        raise ValueError(f"unknown URL scheme {parts.scheme}:// (no fsspec implementation)") from None
    return url.rstrip("/")


def register(location: Location, storage_options: dict[str, Any] | None) -> None:
    """Use ``storage_options`` whenever this process opens the store at URL ``location``."""
    if is_url(location) and storage_options is not None:
        _OPTIONS[str(location).rstrip("/")] = dict(storage_options)


def options(location: Location) -> dict[str, Any]:
    """The storage_options registered for ``location`` (a copy; {} if none)."""
    return dict(_OPTIONS.get(str(location).rstrip("/"), {}))


def zarr_store(location: Location, *, read_only: bool = False) -> Store:
    """A Zarr store at ``location``: LocalStore for a path, FsspecStore for a URL."""
    from zarr.storage import FsspecStore, LocalStore

    path = local_path(location)
    if path is not None:
        return LocalStore(str(path), read_only=read_only)
    url = str(location).rstrip("/")
    return FsspecStore.from_url(url, storage_options=options(url) or None, read_only=read_only)


def problem(location: Location, exc: BaseException) -> str:
    """One line saying why ``location`` could not be reached (no options, no credentials)."""
    where = label(location)
    name = type(exc).__name__
    text = str(exc)
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return _no_bucket(location)
    if isinstance(exc, FileNotFoundError):
        return f"{where}: not found (no such object, or no such bucket)"
    if "Credentials" in name:
        return f"{where}: no usable credentials ({name}): set them in the environment or a profile"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{where}: access denied (check the credentials in the environment or profile)"
    if isinstance(exc, OSError) or "connect" in text.lower() or "Endpoint" in name:
        return f"{where}: cannot reach the storage endpoint ({name}); check storage_options endpoint_url"
    return f"{where}: cannot open the store ({name})"


def _no_bucket(location: Location) -> str:
    bucket = urlsplit(str(location)).netloc
    return f"{label(location)}: bucket {bucket!r} does not exist (or the endpoint serves no such bucket)"


def probe(location: Location) -> list[str]:
    """The top-level names in the store at URL ``location`` ([] for none); ConfigError when
    the bucket is missing, access is denied or the endpoint cannot be reached."""
    store = zarr_store(location, read_only=True)

    async def names() -> list[str]:
        return [name async for name in store.list_dir("")]

    try:
        found = sync(names())
        if found == [] and urlsplit(str(location)).scheme not in ("memory",):
            _bucket_exists(location)
        return found
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure to reach the store is bad input
        raise ConfigError(problem(location, exc)) from None


def _bucket_exists(location: Location) -> None:
    """ConfigError unless the URL's bucket exists (or the filesystem's error reaching it)."""
    import fsspec

    parts = urlsplit(str(location))
    fs = fsspec.filesystem(parts.scheme, **options(location))
    if not fs.exists(parts.netloc):
        raise ConfigError(_no_bucket(location))


def delete_prefix(location: Location) -> None:
    """Delete every object under URL ``location`` (a store jacrun wrote)."""
    sync(zarr_store(location).delete_dir(""))


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
