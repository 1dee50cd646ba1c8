"""Chunk checksums: every chunk jacrun writes ends with a CRC32C of its encoded bytes.

The codec is Zarr v3's standard ``crc32c`` (``zarr.codecs.Crc32cCodec``), appended after
compression, so any Zarr v3 reader checks it. Zarr's own error for a mismatch names neither
the array nor the chunk; :class:`NamingPipeline`, Zarr's default codec pipeline with one
change, re-raises it as :class:`ChecksumError` naming both. :func:`install` makes it the
pipeline of this process (jacrun.store calls it on import): reads are otherwise unchanged.
"""

from __future__ import annotations

from typing import Any

import zarr
import zarr.codecs
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.registry import register_pipeline

CODEC = "crc32c"


class ChecksumError(ValueError):
    """A chunk's stored checksum does not match its bytes: the chunk is corrupted."""


def codec() -> zarr.codecs.Crc32cCodec:
    """The checksum codec, last in every array's bytes-to-bytes codecs."""
    return zarr.codecs.Crc32cCodec()


def with_checksum(compressors: Any) -> list[Any]:
    """``compressors`` (a codec or None) followed by the checksum."""
    return [*([] if compressors is None else [compressors]), codec()]


def has_checksum(array: zarr.Array) -> bool:
    """Whether ``array``'s chunks carry a CRC32C (stores written before checksums do not)."""
    return any(getattr(c, "to_dict", dict)().get("name") == CODEC for c in array.metadata.codecs)


def is_mismatch(exc: BaseException) -> bool:
    """Whether ``exc`` is a checksum mismatch (Zarr's message, or ours)."""
    return isinstance(exc, ChecksumError) or (
        isinstance(exc, ValueError) and "checksum do not match" in str(exc)
    )


def describe(key: str, store: Any) -> str:
    """'chunk c/0/1 of array vjp in STORE' for the chunk at ``key`` (path inside the store)."""
    array, sep, chunk = key.partition("/c/")
    where = f"chunk c/{chunk} of array {array}" if sep else f"object {key}"
    return f"{where} in {store_label(store)}"


def store_label(store: Any) -> str:
    """A store's location for messages (its root or URL, never its options)."""
    root = getattr(store, "root", None) or getattr(store, "path", None)
    return str(root) if root is not None else str(store)


class NamingPipeline(BatchedCodecPipeline):
    """Zarr's default pipeline, except that a checksum mismatch names its array and chunk."""

    async def read_batch(self, batch_info: Any, out: Any, drop_axes: tuple[int, ...] = ()) -> None:
        batch_info = list(batch_info)
        try:
            await super().read_batch(batch_info, out, drop_axes)
        except ValueError as exc:
            if not is_mismatch(exc) or isinstance(exc, ChecksumError):
                raise
            for item in batch_info:  # find the chunk (a batch decodes several)
                try:
                    await super().read_batch([item], out, drop_axes)
                except ValueError as one:
                    if is_mismatch(one):
                        getter = item[0]
                        raise ChecksumError(
                            f"corrupted {describe(getter.path, getter.store)}: its checksum does not "
                            "match; `jacrun verify STORE --repair` then `jacrun submit` recomputes its block"
                        ) from None
                    raise
            raise


def install() -> None:
    """Make :class:`NamingPipeline` this process's codec pipeline (if Zarr's default is in use)."""
    path = f"{NamingPipeline.__module__}.{NamingPipeline.__qualname__}"
    register_pipeline(NamingPipeline)
    if zarr.config.get("codec_pipeline.path") == "zarr.core.codec_pipeline.BatchedCodecPipeline":
        zarr.config.set({"codec_pipeline.path": path})
