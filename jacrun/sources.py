"""Where X and the vectors come from: small picklable readers that a block calls on a worker.

Random numbers form a table per (seed, stream, vector), cut into tiles of :func:`tile_rows`
rows (TILE_ROWS, or fewer for rows wider than TILE_VALUES / TILE_ROWS values, so a tile never
holds more than TILE_VALUES numbers: a block of a few 65,536-wide rows draws a few tiles, not
256 rows).
Tile t is drawn by its own generator, seeded with SeedSequence([seed, stream, t]) (per-tile
seeding: no state to carry), so any rows [a, b) get exactly the numbers they would get in any
other chunking, on any worker, in any order: a pure function of (seed, sample index, vector
index). SFC64 is used for speed (twice Philox's here); SeedSequence decorrelates the tiles.

Normal values come from the Box-Muller transform in float32 (2.1 ns a value here, against
6.9 ns for NumPy's float64 ziggurat): NumPy's vectorised float32 log, sqrt, sin and cos, on
float32 uniforms. The tails stop at sqrt(-2 ln 2^-24) = 5.77 standard deviations, and float32
and float64 jobs see the same values. ``RANDOM_NUMBERS`` names this definition; it is part of
every job's config hash, so a store filled with other numbers is never resumed with these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jacrun.errors import ConfigError
from jacrun.functions import basis_vectors

_INPUTS_STREAM = 1 << 32
_VECTORS_STREAM = 2 << 32
TILE_ROWS = 256
"""Rows per random tile (up to TILE_VALUES values): part of the stored numbers' definition."""
TILE_VALUES = 1 << 20
"""Most values in a tile: rows wider than TILE_VALUES / TILE_ROWS get fewer rows per tile."""
RANDOM_NUMBERS = "sfc64-tiles256-max2^20-v3: normal by float32 Box-Muller; uniform, rademacher from float64"
"""Names the definition of the random tables (part of the config hash): change it with them."""
_TWO_PI = np.float32(2 * np.pi)


def random_rows(
    distribution: str,
    seed: int,
    stream: int,
    start: int,
    stop: int,
    width: int,
    dtype=np.float64,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rows [start, stop) of the (seed, stream) random table with ``width`` columns.

    ``normal`` (standard, float32 Box-Muller), ``uniform`` (on [-1, 1)) or ``rademacher``
    (+-1), written tile by tile into ``out`` (or a new array of ``dtype``): no full-size
    temporary.
    """
    if out is None:
        out = np.empty((stop - start, width), dtype=dtype)
    rows = tile_rows(width)
    for tile in range(start // rows, (stop - 1) // rows + 1):
        first, last = tile * rows, (tile + 1) * rows
        gen = np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, stream, tile])))
        values = _draw(gen, distribution, (rows, width))
        lo, hi = max(first, start), min(last, stop)
        out[lo - start : hi - start] = values[lo - first : hi - first]
    return out


def tile_rows(width: int) -> int:
    """Rows per tile of a table ``width`` values wide: TILE_ROWS, at most TILE_VALUES values."""
    return max(1, min(TILE_ROWS, TILE_VALUES // max(width, 1)))


def _draw(gen: np.random.Generator, distribution: str, shape: tuple[int, int]) -> np.ndarray:
    if distribution == "normal":
        return _normal(gen, shape)
    if distribution == "uniform":
        return 2.0 * gen.random(shape) - 1.0
    if distribution == "rademacher":
        return gen.integers(0, 2, shape, dtype=np.int8) * 2.0 - 1.0
    raise ValueError(f"unknown distribution {distribution!r}")


def _normal(gen: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Standard normal float32 values: z = sqrt(-2 ln u) (cos, sin)(2 pi w) for uniform u, w;
    the cosines fill the first half of the flat tile, the sines the second."""
    size = shape[0] * shape[1]
    half = (size + 1) // 2
    uniforms = gen.random(2 * half, dtype=np.float32)
    radius, angle = uniforms[:half], uniforms[half:]
    np.subtract(np.float32(1), radius, out=radius)  # (0, 1]: the log stays finite
    np.log(radius, out=radius)
    radius *= np.float32(-2)
    np.sqrt(radius, out=radius)
    angle *= _TWO_PI
    values = np.empty(2 * half, np.float32)
    np.cos(angle, out=values[:half])
    np.sin(angle, out=values[half:])
    values[:half] *= radius
    values[half:] *= radius
    return values[:size].reshape(shape)


# ---- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomRows:
    """X with i.i.d. normal or uniform[-1, 1) entries, row r a pure function of (seed, r)."""

    samples: int
    width: int
    distribution: str
    seed: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.samples, self.width)

    def read(self, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        return random_rows(self.distribution, self.seed, _INPUTS_STREAM, start, stop, self.width, dtype)


class _OpenedOnce:
    """A file source's array, opened once per process and kept: never pickled (a memory-mapped
    .npy would travel whole), so each worker opens its own on its first read."""

    path: str | None
    array: str | None
    format: Literal["npy", "zarr"]
    storage_options: dict | None

    def data(self) -> Any:
        opened = self.__dict__.get("_opened")
        if opened is None:
            opened = _open_array(str(self.path), self.array, self.format, self.storage_options)
            self.__dict__["_opened"] = opened  # beside the (frozen) dataclass fields
        return opened

    def keeping(self, data: Any) -> Any:
        """This source, with ``data`` as its opened array (already opened to check it)."""
        self.__dict__["_opened"] = data
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_opened"}


@dataclass(frozen=True)
class ArrayRows(_OpenedOnce):
    """X read from a .npy file (memory-mapped) or a Zarr array, one slice per block."""

    path: str
    array: str | None
    format: Literal["npy", "zarr"]
    shape: tuple[int, ...]
    storage_options: dict | None = None
    """fsspec options of a URL path."""

    def read(self, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        return np.asarray(self.data()[start:stop], dtype=dtype)


def _open_array(path: str, array: str | None, fmt: str, storage_options: dict | None = None):
    if fmt == "npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    import zarr

    from jacrun import location

    if location.is_url(path):  # through fsspec, with this input's options
        location.register(path, storage_options)
        return zarr.open_array(store=location.zarr_store(path, read_only=True), path=array or "", mode="r")
    return zarr.open_array(store=path, path=array or "", mode="r")


def unreadable(exc: BaseException) -> str:
    """Why a user's array file could not be read, in words (never NumPy's advice to unpickle)."""
    text = str(exc)
    if "pickled" in text:
        return "not a NumPy array file (NumPy would read it as pickled objects, which jacrun never loads)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def open_array_checked(
    path: Path | str, array: str | None, fmt: str, key: str, storage_options: dict | None = None
) -> Any:
    """An input array opened (a memory map or a Zarr array, not read); a readable ConfigError
    naming ``key`` when it cannot be opened or is not real numbers."""
    try:
        data = _open_array(str(path), array, fmt, storage_options)
    except Exception as exc:  # noqa: BLE001 - any failure to open is the user's file
        what = f"{path}" + (f" (array {array!r})" if array else "")
        from jacrun import location

        if location.is_url(path):  # name the URL only: the exception may quote options
            raise ConfigError(f"{key}: cannot open zarr array: {location.problem(what, exc)}") from None
        raise ConfigError(f"{key}: cannot open {fmt} array {what}: {unreadable(exc)}") from None
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "fiu":
        raise ConfigError(f"{key}: {path} has dtype {dtype}; expected a real numeric dtype")
    return data


def open_input_file(spec) -> ArrayRows | None:
    """The ``inputs`` of a .npy or Zarr file, opened once with the section's storage options
    (its shape may fix the function's n_in); None for random inputs."""
    if spec.kind == "random":
        return None
    array = getattr(spec, "array", None)
    options = getattr(spec, "storage_options", None)
    data = open_array_checked(spec.path, array, spec.kind, "inputs.path", options)
    shape = tuple(int(s) for s in data.shape)
    return ArrayRows(str(spec.path), array, spec.kind, shape, options).keeping(data)


def open_inputs(spec, n_in: int, opened: ArrayRows | None = None) -> RandomRows | ArrayRows:
    """A reader for the ``inputs`` section, its shape checked against the function's n_in;
    ``opened``: the file :func:`open_input_file` already opened."""
    if spec.kind == "random":
        return RandomRows(spec.samples, n_in, spec.distribution, spec.seed)
    rows = opened or open_input_file(spec)
    shape = rows.shape
    if len(shape) != 2 or shape[1] != n_in:
        raise ConfigError(f"inputs.path: {spec.path} has shape {shape}; the function needs (samples, {n_in})")
    if shape[0] == 0:
        raise ConfigError(f"inputs.path: {spec.path} has no rows")
    return rows


# ---- vectors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorSource(_OpenedOnce):
    """K vectors of width d per sample (or shared by all samples), read by block.

    ``squeeze`` marks per-sample vectors with K = 1 given without a vector axis: the result
    then has no ``vector`` dimension, like ``y.backward(v)``.
    """

    kind: str
    width: int
    count: int
    shared: bool
    squeeze: bool
    distribution: str = "normal"
    seed: int = 0
    path: str | None = None
    array: str | None = None
    format: Literal["npy", "zarr"] = "npy"
    colouring: Any = field(default=None, compare=False, repr=False)
    """The :class:`jacrun.sparsity.SparseJacobian` whose seeds kind ``seeds`` reads."""
    storage_options: dict | None = None
    """fsspec options of a URL path."""

    def read(self, start: int, stop: int, k0: int, k1: int, dtype: np.dtype) -> np.ndarray:
        """Vectors k0:k1 of samples start:stop, shape (stop - start, k1 - k0, width).

        Shared vectors come back as a read-only broadcast view.
        """
        rows = stop - start
        if self.kind == "basis":
            block = basis_vectors(self.width, k0, k1, dtype)
        elif self.kind == "seeds":
            block = self.colouring.seeds(k0, k1, dtype)
        elif self.kind == "ones":
            block = np.ones((k1 - k0, self.width), dtype=dtype)
        elif self.kind == "random":
            first, last = (0, 1) if self.shared else (start, stop)
            block = np.empty((last - first, k1 - k0, self.width), dtype=dtype)
            for index, k in enumerate(range(k0, k1)):
                stream = _VECTORS_STREAM | k
                random_rows(
                    self.distribution, self.seed, stream, first, last, self.width, out=block[:, index]
                )
            if not self.shared:
                return block
            block = block[0]
        else:
            data = self.data()
            if self.shared:
                block = np.asarray(data[k0:k1] if data.ndim == 2 else data[None, :], dtype=dtype)
            elif self.squeeze:
                return np.asarray(data[start:stop], dtype=dtype)[:, None, :]
            else:
                return np.ascontiguousarray(data[start:stop, k0:k1], dtype=dtype)
        return np.broadcast_to(block, (rows, *block.shape))


def open_vectors(spec, width: int, samples: int) -> VectorSource:
    """A reader for the ``vectors`` section; ``width`` is m (vjp) or n (jvp)."""
    if spec.kind == "basis":
        return VectorSource("basis", width, width, shared=True, squeeze=False)
    if spec.kind == "ones":
        return VectorSource("ones", width, 1, shared=True, squeeze=True)
    if spec.kind == "random":
        return VectorSource(
            "random",
            width,
            spec.count,
            shared=spec.shared,
            squeeze=not spec.shared and spec.count == 1,
            distribution=spec.distribution,
            seed=spec.seed,
        )
    array = getattr(spec, "array", None)
    options = getattr(spec, "storage_options", None)
    data = open_array_checked(spec.path, array, spec.kind, "vectors.path", options)
    shape = tuple(int(s) for s in data.shape)
    where = f"vectors.path: {spec.path} has shape {shape}"
    if shape[-1] != width:
        raise ConfigError(f"{where}; its last axis must be the vector width {width}")
    if spec.shared:
        if len(shape) not in (1, 2):
            raise ConfigError(f"{where}; shared vectors are (K, {width}) or ({width},)")
        count = shape[0] if len(shape) == 2 else 1
        squeeze = False
    else:
        if len(shape) not in (2, 3):
            raise ConfigError(
                f"{where}; per-sample vectors are ({samples}, K, {width}) or ({samples}, {width})"
                " (set vectors.shared: true for (K, width) shared by all samples)"
            )
        if shape[0] != samples:
            raise ConfigError(f"{where}; its first axis must match the {samples} input samples")
        count = shape[1] if len(shape) == 3 else 1
        squeeze = len(shape) == 2
    if count == 0:
        raise ConfigError(f"{where}; it holds no vectors")
    return VectorSource(
        spec.kind,
        width,
        count,
        shared=spec.shared,
        squeeze=squeeze,
        path=str(spec.path),
        array=array,
        format=spec.kind,
        storage_options=options,
    ).keeping(data)


def basis_source(width: int) -> VectorSource:
    """The implied basis of ``jacobian`` mode (output basis for rev, input basis for fwd)."""
    return VectorSource("basis", width, width, shared=True, squeeze=False)


def seed_source(sparse) -> VectorSource:
    """The seeds of a sparse Jacobian's colouring: one shared vector per colour."""
    return VectorSource("seeds", sparse.width, sparse.n_colours, shared=True, squeeze=False, colouring=sparse)
