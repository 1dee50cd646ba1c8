"""The only Zarr code: create or reopen a job's output store, write blocks, markers, load().

Layout (design section 3): the result array (``vjp``, ``jvp`` or ``jacobian``), ``y`` when
outputs are saved, and ``_blocks``, one uint8 marker chunk per block, set to 1 after the
block's data is written. Each block owns whole chunks, so blocks need no locks; writing a
block twice writes the same bytes. Job metadata lives in the group attribute ``jacrun``.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
import zarr.codecs
import zarr.storage
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from jacrun import checksum, lease, location, writeback
from jacrun.errors import ConfigError
from jacrun.location import Location
from jacrun.plan import Plan
from jacrun.reduce import Reducer, combine

ATTR = "jacrun"
MARKERS = "_blocks"
OUTPUTS = "y"

StoreState = Literal["absent", "empty", "jacrun", "foreign"]

checksum.install()  # a corrupted chunk's error names its array and chunk


class IncompleteWarning(UserWarning):
    """The store's job has not finished every block."""


class WriteBehindStore(LocalStore):
    """A LocalStore whose large chunk files stream to disk (:mod:`jacrun.writeback`)
    instead of accumulating as dirty pages in the page cache. ``marker``: the marker file of
    the block being written, cleared if its data later turns out not to have reached the disk."""

    marker: Path | None = None

    async def set(self, key: str, value: Buffer) -> None:
        await super().set(key, value)
        if writeback.streams(len(value)):  # else no thread hop for a call that does nothing
            await asyncio.to_thread(writeback.written, self.root / key, len(value), self.marker)

    def set_sync(self, key: str, value: Buffer) -> None:
        super().set_sync(key, value)
        writeback.written(self.root / key, len(value), self.marker)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_state(path: Location) -> StoreState:
    """What is at ``path``: nothing, an empty folder, a jacrun store, or something else.
    For a URL: ConfigError when its bucket or endpoint cannot be reached."""
    if location.local_path(path) is None:
        return _remote_state(path)
    path = Path(path)
    if not path.exists():
        return "absent"
    if path.is_dir() and not any(p.name != lease.KEY for p in path.iterdir()):  # a lease alone: empty
        return "empty"
    if path.is_dir() and (path / "zarr.json").is_file():
        return _group_state(str(path))
    return "foreign"


def _remote_state(url: Location) -> StoreState:
    names = [name for name in location.probe(url) if name != lease.KEY]
    if not names:
        return "empty"
    if "zarr.json" in names:
        return _group_state(_zarr(url))
    return "foreign"


def _group_state(store: str | zarr.abc.store.Store) -> StoreState:
    """``jacrun`` when the Zarr group at ``store`` holds a job's attributes, else ``foreign``."""
    try:
        attrs = zarr.open_group(store, mode="r").attrs.asdict()
    except Exception:  # noqa: BLE001 - unreadable metadata means: not ours
        return "foreign"
    return "jacrun" if isinstance(attrs.get(ATTR), dict) and "config_hash" in attrs[ATTR] else "foreign"


def _zarr(path: Location, read_only: bool = False) -> zarr.abc.store.Store:
    """The Zarr store at a path or URL (see jacrun.location)."""
    return location.zarr_store(path, read_only=read_only)


def read_attrs(path: Location) -> dict[str, Any]:
    """The ``jacrun`` attributes of a store (ConfigError if it is not a jacrun store)."""
    if store_state(path) != "jacrun":
        raise ConfigError(f"{location.label(path)}: not a jacrun store")
    return dict(zarr.open_group(_zarr(path), mode="r").attrs[ATTR])


def update_attrs(path: Location, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into the ``jacrun`` attributes (called from the client only)."""
    group = zarr.open_group(_zarr(path), mode="r+")
    attrs = dict(group.attrs[ATTR])
    attrs.update(changes)
    attrs["updated"] = now()
    group.attrs[ATTR] = attrs
    return attrs


def remove_store(path: Location) -> None:
    """Delete a store, but only one jacrun wrote (for a URL: every object under its prefix)."""
    if store_state(path) != "jacrun":
        raise ConfigError(f"{location.label(path)}: refusing to delete: not a store written by jacrun")
    if location.local_path(path) is None:
        location.delete_prefix(path)
    else:
        shutil.rmtree(path)


def _compressors(name: str) -> Any:
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=1)  # float results barely compress: favour speed
    if name == "blosc":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    return None


_WRITE_CONFIG = {"write_empty_chunks": True}
"""A block's chunks are always written: zarr's default first scans each chunk for the fill
value (NaN), a full pass with a temporary mask (7 ms instead of 12 for a 16 MiB chunk)."""


def _encoder(arrays: list[np.ndarray], compression: str, dtype: str) -> tuple[dict, Callable[[], None], int]:
    """One in-memory array per non-empty input (zarr cannot chunk an empty one), a single chunk
    each with the job's codecs: (the store's key -> encoded bytes dict, a function that encodes
    every input into it once (cast to ``dtype``), the inputs' raw bytes as ``dtype``)."""
    arrays = [values for values in arrays if values.size]
    contents: dict = {}
    group = zarr.open_group(zarr.storage.MemoryStore(contents), mode="w", zarr_format=3)
    targets = [
        group.create_array(
            f"a{n}",
            shape=values.shape,
            chunks=values.shape,
            dtype=dtype,
            compressors=checksum.with_checksum(_compressors(compression)),
            config=_WRITE_CONFIG,
        )
        for n, values in enumerate(arrays)
    ]

    def encode() -> None:
        for target, values in zip(targets, arrays, strict=True):
            target[...] = values.astype(dtype, copy=False)

    return contents, encode, sum(values.size for values in arrays) * np.dtype(dtype).itemsize


def encode_seconds(arrays: list[np.ndarray], compression: str, dtype: str) -> float:
    """Seconds to encode ``arrays`` (cast to ``dtype``) as one chunk each with the job's codec,
    into an in-memory store: a block's write without the disk (best of two)."""
    _, encode, raw = _encoder(arrays, compression, dtype)
    if not raw:
        return 0.0
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        encode()
        best = min(best, time.perf_counter() - start)
    return best


def encoded_fraction(arrays: list[np.ndarray], compression: str, dtype: str) -> float:
    """Encoded bytes (with the checksums) over raw bytes of ``arrays`` as chunks of the job's
    codec: how much of a store's raw size reaches the disk, measured on a sample."""
    contents, encode, raw = _encoder(arrays, compression, dtype)
    encode()
    encoded = sum(len(value) for key, value in contents.items() if "/c/" in key)  # chunks, not metadata
    return encoded / raw if raw else 1.0


def create_store(
    path: Location,
    plan: Plan,
    attrs: dict[str, Any],
    *,
    dtype: str,
    compression: str,
    sparse: Any = None,
    reducer: Reducer | None = None,
) -> None:
    """Create the group, the arrays and the empty marker grid; for a sparse Jacobian
    (``sparse``, a :class:`jacrun.sparsity.SparseJacobian`) also its pattern and colouring; for
    reductions, the arrays of the blocks' partials and the norms."""
    group = zarr.open_group(_zarr(path), mode="w", zarr_format=3)
    compressors = checksum.with_checksum(_compressors(compression))  # every chunk: CRC32C last
    if plan.products:
        group.create_array(
            plan.result_name,
            shape=plan.result_shape,
            chunks=plan.result_chunks,
            dtype=dtype,
            fill_value=np.nan,
            compressors=compressors,
            dimension_names=plan.result_dims,
        )
    if reducer is not None:
        _create_partials(group, plan, reducer)
    if plan.save_outputs:
        group.create_array(
            OUTPUTS,
            shape=(plan.samples, plan.n_out),
            chunks=(plan.samples_per_block, plan.n_out),
            dtype=dtype,
            fill_value=np.nan,
            compressors=compressors,
            dimension_names=("sample", "output"),
        )
    group.create_array(
        MARKERS,
        shape=plan.grid,
        chunks=(1, 1),
        dtype="uint8",
        fill_value=0,
        compressors=checksum.with_checksum(None),
        dimension_names=("sample_block", "vector_block"),
    )
    if sparse is not None:
        _write_pattern(group, sparse)
    group.attrs[ATTR] = {**attrs, "created": now(), "updated": now()}


PARTIAL = "_partial_"
"""Prefix of the arrays that keep every block's partial sums until the last block is done."""


def _create_partials(group: zarr.Group, plan: Plan, reducer: Reducer) -> None:
    """``_partial_mean`` (sample_block, *product), ``_partial_gram`` (sample_block, vector_block,
    w, w), and ``norms``: each block owns its chunk of each."""
    float64 = {"dtype": "float64", "fill_value": np.nan, "compressors": _checksummed_zstd()}
    if "mean" in reducer.names:
        group.create_array(
            f"{PARTIAL}mean",
            shape=(plan.grid[0], *reducer.product_shape),
            chunks=(1, *plan.result_chunks[1:]),  # a Jacobian's reductions take all its vectors a block
            dimension_names=("sample_block", *reducer.product_dims),
            **float64,
        )
    if "gram" in reducer.names:
        width = reducer.width
        group.create_array(
            f"{PARTIAL}gram",
            shape=(*plan.grid, width, width),
            chunks=(1, 1, width, width),
            dimension_names=("sample_block", "vector_block", *reducer.gram_dims),
            **float64,
        )
    if "norms" in reducer.names:
        group.create_array(
            "norms",
            shape=reducer.norms_shape,
            chunks=reducer.norms_chunks,
            dimension_names=reducer.norms_dims,
            **float64,
        )


def finish_reductions(path: Location, plan: Plan, reducer: Reducer) -> dict[str, np.ndarray]:
    """Combine every block's partials in block order into the final results, store them (Gram
    with its eigenvalues and eigenvectors, descending) and delete the partials. Called once,
    by the client, when every block is done."""
    group = zarr.open_group(_zarr(path), mode="r+")
    sums: dict[str, np.ndarray] = {}
    if f"{PARTIAL}mean" in group:
        partial = group[f"{PARTIAL}mean"]
        sums["mean"] = combine([partial[i] for i in range(plan.grid[0])])
    if f"{PARTIAL}gram" in group:
        partial = group[f"{PARTIAL}gram"]
        blocks = [(i, j) for i in range(plan.grid[0]) for j in range(plan.grid[1])]
        sums["gram"] = combine([partial[i, j] for i, j in blocks])
    results = reducer.finish(sums)
    dims = {
        "mean": reducer.product_dims,
        "gram": reducer.gram_dims,
        "gram_eigenvalues": ("eigen",),
        "gram_eigenvectors": (reducer.gram_dims[0], "eigen"),
    }
    for name, values in results.items():
        array = group.create_array(
            name,
            shape=values.shape,
            chunks=values.shape,
            dtype="float64",
            compressors=_checksummed_zstd(),
            dimension_names=dims[name],
            overwrite=True,
        )
        array[...] = values
    for name in (f"{PARTIAL}mean", f"{PARTIAL}gram"):
        if name in group:
            del group[name]
    consolidate(path)
    return results


PATTERN = ("indptr", "indices", "colours")
"""A sparse Jacobian store's pattern (CSR ``indptr`` and ``indices``) and colouring."""


def _write_pattern(group: zarr.Group, sparse: Any) -> None:
    colour_dim = "input" if sparse.direction == "fwd" else "output"
    for name, values, dim in (
        ("indptr", sparse.indptr, "indptr"),
        ("indices", sparse.indices, "nonzero"),
        ("colours", sparse.colours, colour_dim),
    ):
        array = group.create_array(
            name,
            shape=values.shape,
            chunks=values.shape,
            dtype=values.dtype,
            compressors=_checksummed_zstd(),
            dimension_names=(dim,),
        )
        array[...] = values


def read_pattern(path: Location) -> dict[str, np.ndarray]:
    """``indptr``, ``indices`` and ``colours`` of a sparse Jacobian store (ConfigError if absent)."""
    group = zarr.open_group(_zarr(path, read_only=True), mode="r")
    if not all(name in group for name in PATTERN):
        raise ConfigError(f"{path}: not a sparse Jacobian store (no indptr, indices, colours)")
    return {name: group[name][...] for name in PATTERN}


def read_rows(path: Location, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of array ``name`` (for the sparse helpers of :mod:`jacrun.api`)."""
    return zarr.open_group(_zarr(path, read_only=True), mode="r")[name][start:stop]


def _checksummed_zstd() -> Any:
    return checksum.with_checksum(_compressors("zstd"))


def store_chunks(path: Location, plan: Plan) -> tuple[int, int] | None:
    """(samples, vectors) per block of an existing store's result array, or None if absent."""
    group = zarr.open_group(_zarr(path), mode="r")
    if plan.result_name not in group:
        if plan.products:
            return None
        stored = group.attrs[ATTR].get("plan", {})
        return stored.get("samples_per_block"), stored.get("vectors_per_block")
    chunks = group[plan.result_name].chunks
    if plan.sparse:
        return chunks[0], plan.vectors_per_block
    if plan.mode == "jacobian":
        return chunks[0], (chunks[1] if plan.strategy == "rev" else chunks[2])
    return chunks[0], (chunks[1] if plan.vector_dim else 1)


def write_block(
    path: str,
    plan: Plan,
    i: int,
    j: int,
    y: np.ndarray | None,
    result: np.ndarray,
    partials: dict[str, np.ndarray] | None = None,
) -> None:
    """Write block (i, j)'s chunks and its reductions' ``partials``, then its marker. ``result``
    is (rows, k, width), or a sparse Jacobian's nonzeros (rows, nnz)."""
    a, b = plan.block_rows(i)
    k0, k1 = plan.block_vectors(j)
    local = location.local_path(path) is not None  # else an object store: whole-chunk puts
    target = WriteBehindStore(path) if local else _zarr(path)
    group = zarr.open_group(target, mode="r+")
    markers = group[MARKERS]
    if local:
        target.marker = target.root / MARKERS / markers.metadata.encode_chunk_key((i, j))
    _write_partials(group, plan, i, j, partials or {})
    array = group[plan.result_name].with_config(_WRITE_CONFIG) if plan.products else None
    if array is None:
        pass
    elif plan.sparse:
        array[a:b, :] = result
    elif plan.mode == "jacobian":
        if plan.strategy == "rev":
            array[a:b, k0:k1, :] = result
        else:
            array[a:b, :, k0:k1] = result.transpose(0, 2, 1)
    elif plan.vector_dim:
        array[a:b, k0:k1, :] = result
    else:
        array[a:b, :] = result[:, 0, :]
    if y is not None and j == 0 and plan.save_outputs:
        group[OUTPUTS].with_config(_WRITE_CONFIG)[a:b, :] = y
    error = writeback.failed(target.marker) if local else None  # this block's data, found bad later
    if error is not None:
        raise OSError(error.code, error.reason)
    markers[i, j] = 1


def _write_partials(group: zarr.Group, plan: Plan, i: int, j: int, partials: dict[str, np.ndarray]) -> None:
    a, b = plan.block_rows(i)
    k0, k1 = plan.block_vectors(j)
    if "mean" in partials:
        target = group[f"{PARTIAL}mean"]
        if target.ndim == 3 and plan.mode != "jacobian":
            target[i, k0:k1] = partials["mean"]
        else:
            target[i] = partials["mean"]
    if "gram" in partials:
        group[f"{PARTIAL}gram"][i, j] = partials["gram"]
    if "norms" in partials:
        norms = group["norms"]
        if norms.ndim == 2:
            norms[a:b, k0:k1] = partials["norms"]
        else:
            norms[a:b] = partials["norms"]


def unmark_block(path: Location, block: tuple[int, int]) -> None:
    """Mark a block not done (its data turned out not to be on disk)."""
    zarr.open_group(_zarr(path), mode="r+")[MARKERS][block] = 0


def marker_block(marker: str | Path) -> tuple[int, int] | None:
    """The block (i, j) whose marker chunk file is ``marker`` (``.../_blocks/c/i/j``), or None."""
    parts = Path(marker).parts
    if len(parts) < 4 or parts[-4:-2] != (MARKERS, "c") or not (parts[-2].isdigit() and parts[-1].isdigit()):
        return None
    return int(parts[-2]), int(parts[-1])


def describe_arrays(path: Location) -> dict[str, str]:
    """One line per array: dims, shape, dtype, chunks (for ``jacrun show``)."""
    group = zarr.open_group(_zarr(path), mode="r")
    lines = {}
    for name, array in sorted(group.arrays()):
        dims = ", ".join(array.metadata.dimension_names or ())
        lines[name] = f"({dims}) {array.shape} {array.dtype}, chunks {array.chunks}"
    return lines


def read_markers(path: Location) -> np.ndarray:
    """Boolean grid of finished blocks (ConfigError for a corrupted marker: verify --repair)."""
    try:
        return zarr.open_group(_zarr(path), mode="r")[MARKERS][...].astype(bool)
    except checksum.ChecksumError as exc:
        raise ConfigError(str(exc).replace("STORE", location.label(path))) from None


def consolidate(path: Location) -> None:
    """Write consolidated metadata so ``xarray.open_zarr`` opens the store in one read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not part of the v3 spec yet": we know
        zarr.consolidate_metadata(_zarr(path))


def load(path: Location, *, markers: bool = False, storage_options: dict[str, Any] | None = None):
    """Open a store (a path or URL) as a lazy, dask-backed ``xarray.Dataset`` with named dimensions.

    ``storage_options``: fsspec options of a URL (endpoint_url, anon, profile, ...). Warns
    (IncompleteWarning) when the job has not finished every block: missing blocks read as NaN.
    """
    import xarray as xr

    path = path if location.is_url(path) else Path(path)
    location.register(path, storage_options)
    attrs = read_attrs(path)
    drop = [] if markers else [MARKERS]
    ds = xr.open_zarr(_zarr(path, read_only=True), consolidated=False, drop_variables=drop, zarr_format=3)
    marks = read_markers(path)
    done, total = int(marks.sum()), marks.size
    if done != total:
        warnings.warn(
            f"{path}: job incomplete ({done}/{total} blocks, status {attrs.get('status')}); "
            "missing blocks read as NaN. Rerun `jacrun submit` with the same config to finish it.",
            IncompleteWarning,
            stacklevel=2,
        )
    return ds
