"""``jacrun verify``: read every chunk of every finished block and check it (part of the store layer).

A block is damaged when its marker is set but one of its chunks is missing, fails its
checksum or does not decode, or when its marker itself is corrupted. Block (i, j) owns chunk
``(i, ..., j, ...)`` of every array with a sample dimension (block grid = chunk grid; the
vector-block index sits in the one other dimension split into several chunks, and is 0 for
arrays a block writes only when j == 0, such as ``y``). Arrays without a sample dimension
belong to the store as a whole: their damage is reported, and no rerun repairs it.
``repair`` clears the damaged blocks' markers, so the next ``jacrun submit`` recomputes
exactly them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import zarr

from jacrun import checksum, location
from jacrun.errors import ConfigError
from jacrun.location import Location

Block = tuple[int, int]


@dataclass
class Report:
    """What :func:`verify_store` found."""

    store: str
    blocks_total: int
    blocks_marked: int
    chunks_checked: int = 0
    checksummed: bool = True
    """Whether every array's chunks carry a checksum (stores written before checksums do not)."""
    damaged: dict[Block, list[str]] = field(default_factory=dict)
    """Marked blocks found damaged, and what is wrong with each."""
    store_damage: list[str] = field(default_factory=list)
    """Damage that belongs to no block (arrays written once when the store was created)."""
    samples_per_block: int = 1
    samples: int = 0

    @property
    def intact(self) -> bool:
        return not self.damaged and not self.store_damage

    def block_label(self, block: Block) -> str:
        a = block[0] * self.samples_per_block
        return f"block {block} samples {a}:{min(a + self.samples_per_block, self.samples)}"


def _open(where: Location):
    """The store's group; ConfigError when it is not a jacrun store."""
    from jacrun import store

    store.read_attrs(where)  # ConfigError: not a jacrun store
    return zarr.open_group(location.zarr_store(where, read_only=True), mode="r")


def _owners(array: zarr.Array) -> tuple[bool, int | None]:
    """(whether the array has a sample dimension, the index of its vector-block dimension)."""
    dims = tuple(array.metadata.dimension_names or ())
    if not dims or dims[0] != "sample":
        return False, None
    split = [d for d in range(1, array.ndim) if array.cdata_shape[d] > 1]
    return True, (split[0] if split else None)


def _chunks_of(array: zarr.Array, block: Block, vector_dim: int | None) -> Iterator[tuple[int, ...]]:
    """The chunk coordinates of ``array`` that ``block`` writes."""
    i, j = block
    if vector_dim is None and j != 0:
        return
    grid = array.cdata_shape
    if i >= grid[0] or (vector_dim is not None and j >= grid[vector_dim]):
        return
    ranges = [range(n) for n in grid]
    ranges[0] = range(i, i + 1)
    if vector_dim is not None:
        ranges[vector_dim] = range(j, j + 1)
    yield from product(*ranges)


def _check_chunk(array: zarr.Array, coords: tuple[int, ...]) -> str | None:
    """What is wrong with one chunk (missing, corrupted, undecodable), or None."""
    key = f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
    what = f"{array.path} chunk {'/'.join(map(str, coords))}"
    if not location.exists(array.store_path.store, key):
        return f"{what} missing"
    selection = tuple(
        slice(c * size, min((c + 1) * size, n))
        for c, size, n in zip(coords, array.chunks, array.shape, strict=True)
    )
    try:
        array[selection]
    except Exception as exc:  # noqa: BLE001 - any failure to read back is damage
        if checksum.is_mismatch(exc):
            return f"{what} corrupted (checksum mismatch)"
        return f"{what} unreadable ({type(exc).__name__}: {exc})"
    return None


def check_blocks(
    where: Location, blocks: list[Block], storage_options: dict | None = None
) -> list[tuple[Block, list[str], int]]:
    """(block, problems, chunks read) for each of ``blocks`` whose marker is set or unreadable.

    Runs in a thread or on a Dask worker: it opens the store itself (``storage_options``: a
    URL's fsspec options, for a worker)."""
    location.register(where, storage_options)
    group = _open(where)
    from jacrun.store import MARKERS

    markers = group[MARKERS]
    arrays = [(group[name], _owners(group[name])) for name in sorted(group.array_keys()) if name != MARKERS]
    found = []
    for block in blocks:
        problem = _check_chunk(markers, block)
        if problem is None:
            if not markers[block]:
                continue  # not done: nothing to check
            problems = []
        elif problem.endswith("missing"):
            continue  # no marker: not done
        else:
            problems = [f"marker {problem.split(' ', 1)[1]}"]
        count = 1
        for array, (by_sample, vector_dim) in arrays:
            if not by_sample:
                continue
            for coords in _chunks_of(array, block, vector_dim):
                count += 1
                problem = _check_chunk(array, coords)
                if problem:
                    problems.append(problem)
        found.append((block, problems, count))
    return found


def check_store_arrays(where: Location) -> tuple[list[str], int]:
    """Problems in the arrays that belong to no block (written when the store was created)."""
    from jacrun.store import MARKERS

    group = _open(where)
    problems, count = [], 0
    for name in sorted(group.array_keys()):
        array = group[name]
        if name == MARKERS or _owners(array)[0] or not array.nchunks_initialized:
            continue
        for coords in product(*(range(n) for n in array.cdata_shape)):
            count += 1
            problem = _check_chunk(array, coords)
            if problem:
                problems.append(problem)
    return problems, count


def _batches(blocks: list[Block], parts: int) -> list[list[Block]]:
    size = max(1, -(-len(blocks) // max(parts, 1)))
    return [blocks[n : n + size] for n in range(0, len(blocks), size)]


def verify_store(
    where: Location,
    *,
    threads: int = 8,
    client=None,
    advance: Callable[[int], None] | None = None,
) -> Report:
    """Check every chunk of every marked block of the store at ``where``.

    Reads in ``threads`` threads, or as tasks on a Dask ``client``'s cluster when given.
    ``advance(n)`` is called as each batch of n blocks is checked (for a progress bar).
    """
    from jacrun.store import MARKERS

    group = _open(where)
    markers = group[MARKERS]
    names = sorted(group.array_keys())
    first = next((group[n] for n in names if n != MARKERS and _owners(group[n])[0]), None)
    report = Report(
        store=location.label(where),
        blocks_total=int(np.prod(markers.shape)),
        blocks_marked=0,
        checksummed=all(checksum.has_checksum(group[n]) for n in names),
        samples_per_block=first.chunks[0] if first is not None else 1,
        samples=first.shape[0] if first is not None else 0,
    )
    blocks = [tuple(b) for b in np.ndindex(*markers.shape)]
    report.store_damage, report.chunks_checked = check_store_arrays(where)
    parts = 64 if client is not None else threads * 4
    batches = _batches(blocks, parts)

    def record(batch: list[Block], found: list[tuple[Block, list[str], int]]) -> None:
        for block, problems, count in found:
            report.blocks_marked += 1
            report.chunks_checked += count
            if problems:
                report.damaged[block] = problems
        if advance is not None:
            advance(len(batch))

    if client is not None:
        from distributed import as_completed as dask_completed

        options = location.options(where) or None
        futures = {
            client.submit(check_blocks, str(where), batch, options, pure=False): batch for batch in batches
        }
        for future in dask_completed(futures, loop=client.loop):
            record(futures[future], future.result())
    else:
        with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            futures = {pool.submit(check_blocks, where, batch): batch for batch in batches}
            for future in as_completed(futures):
                record(futures[future], future.result())
    report.damaged = dict(sorted(report.damaged.items()))
    return report


def repair(where: Location, blocks: list[Block]) -> None:
    """Clear the markers of ``blocks`` so that the next ``jacrun submit`` recomputes them."""
    from jacrun import store

    if blocks and store.read_attrs(where).get("reductions"):
        raise ConfigError(
            f"{location.label(where)}: its reductions were combined from every block and the blocks' "
            "partial sums deleted, so recomputing some blocks cannot repair them; rerun the job "
            "with --overwrite"
        )
    group = zarr.open_group(location.zarr_store(where), mode="r+")
    markers = group[store.MARKERS]
    for block in blocks:
        markers[block] = 0  # rewrites a corrupted marker too
    if blocks:
        store.update_attrs(where, status="incomplete", blocks_done=int(np.count_nonzero(markers[...])))
