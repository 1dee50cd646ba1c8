"""Readers of X and vectors: random numbers independent of chunking; array files checked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jacrun.config import NpyVectors, RandomVectors
from jacrun.errors import ConfigError
from jacrun.sources import (
    TILE_ROWS,
    TILE_VALUES,
    RandomRows,
    basis_source,
    open_vectors,
    random_rows,
    tile_rows,
)

F64 = np.dtype("float64")


@pytest.mark.parametrize("distribution", ["normal", "uniform", "rademacher"])
@pytest.mark.parametrize("width", [1, 3, 4, 7])
def test_random_rows_do_not_depend_on_chunking(distribution, width):
    n = 3 * TILE_ROWS + 7
    whole = random_rows(distribution, 5, 1, 0, n, width)
    cuts = [(0, 1), (1, 37), (37, TILE_ROWS + 3), (TILE_ROWS + 3, 2 * TILE_ROWS), (2 * TILE_ROWS, n)]
    parts = [random_rows(distribution, 5, 1, a, b, width) for a, b in cuts]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    assert not np.array_equal(whole, random_rows(distribution, 6, 1, 0, n, width))
    assert not np.array_equal(whole, random_rows(distribution, 5, 2, 0, n, width))
    assert not np.array_equal(whole[:TILE_ROWS], whole[TILE_ROWS : 2 * TILE_ROWS])  # tiles differ


@pytest.mark.parametrize("distribution", ["normal", "uniform", "rademacher"])
def test_wide_rows_come_in_short_tiles_that_do_not_depend_on_chunking(distribution):
    width = 70_000  # over TILE_VALUES / TILE_ROWS: tiles of 14 rows, not 256
    assert tile_rows(width) == TILE_VALUES // width == 14 and tile_rows(4096) == TILE_ROWS
    whole = random_rows(distribution, 5, 1, 0, 40, width, np.float32)
    parts = [random_rows(distribution, 5, 1, a, b, width, np.float32) for a, b in ((0, 3), (3, 15), (15, 40))]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    assert not np.array_equal(whole[:14], whole[14:28])  # tiles differ


def test_distributions_have_the_right_moments():
    normal = random_rows("normal", 0, 1, 0, 20000, 10)
    assert abs(normal.mean()) < 0.02 and abs(normal.std() - 1) < 0.02
    uniform = random_rows("uniform", 0, 1, 0, 20000, 10)
    assert uniform.min() >= -1 and uniform.max() < 1 and abs(uniform.mean()) < 0.02
    signs = random_rows("rademacher", 0, 1, 0, 20000, 10)
    assert set(np.unique(signs)) == {-1.0, 1.0} and abs(signs.mean()) < 0.02


def test_normal_values_follow_the_standard_normal_cdf():
    """Kolmogorov-Smirnov distance to Phi, in the body and (by the counts) in both tails; odd
    widths check the cosine/sine halves of a tile, and the tails stop at 5.77 sigma."""
    raw = random_rows("normal", 3, 1, 0, 40 * TILE_ROWS, 33)
    tiles = raw.reshape(40, TILE_ROWS, 33)  # each tile: cosine rows first, then sine rows
    half = TILE_ROWS // 2
    assert abs(np.corrcoef(tiles[:, :half].ravel(), tiles[:, half:].ravel())[0, 1]) < 0.01
    z = np.sort(raw.ravel())
    n = z.size
    phi = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    ks = max(np.max(np.arange(1, n + 1) / n - phi), np.max(phi - np.arange(n) / n))
    assert ks < 1.63 / math.sqrt(n)  # the 1% critical value
    for threshold, expected in ((2.0, 0.02275), (3.0, 0.0013499)):
        for tail in (z > threshold, z < -threshold):
            assert abs(tail.mean() - expected) < 5 * math.sqrt(expected / n)
    assert np.abs(z).max() <= 5.78


def test_float32_and_float64_jobs_draw_the_same_random_values():
    for distribution in ("normal", "uniform", "rademacher"):
        x64 = random_rows(distribution, 2, 1, 5, 600, 9, np.float64)
        x32 = random_rows(distribution, 2, 1, 5, 600, 9, np.float32)
        np.testing.assert_array_equal(x32, x64.astype(np.float32))
    normal = random_rows("normal", 2, 1, 5, 600, 9, np.float64)
    np.testing.assert_array_equal(normal, normal.astype(np.float32))  # float32 values, exactly


def test_random_numbers_definition_is_part_of_the_config_hash(monkeypatch):
    import jacrun
    import jacrun.sources
    from tests.helpers import job_config

    config = jacrun.config_from_dict(job_config())
    before = config.content_hash()
    monkeypatch.setattr(jacrun.sources, "RANDOM_NUMBERS", "another generator")
    assert config.content_hash() != before


def test_random_inputs_cast_to_compute_dtype():
    rows = RandomRows(50, 4, "normal", 1)
    x32 = rows.read(10, 20, np.dtype("float32"))
    assert x32.dtype == np.float32
    np.testing.assert_array_equal(x32, rows.read(0, 50, F64)[10:20].astype(np.float32))


def test_random_vectors_do_not_depend_on_row_or_vector_blocks():
    source = open_vectors(RandomVectors(kind="random", count=5, seed=3), width=4, samples=600)
    whole = source.read(0, 600, 0, 5, F64)
    assert whole.shape == (600, 5, 4)
    np.testing.assert_array_equal(whole[200:530, 2:4], source.read(200, 530, 2, 4, F64))
    np.testing.assert_array_equal(whole[20:45, 4:5], source.read(20, 45, 4, 5, F64))
    assert not source.squeeze


def test_shared_vectors_are_the_same_for_every_sample():
    source = open_vectors(RandomVectors(kind="random", count=3, shared=True), width=4, samples=60)
    block = source.read(5, 25, 0, 3, F64)
    assert block.shape == (20, 3, 4) and not block.flags.writeable
    np.testing.assert_array_equal(block[0], block[-1])
    np.testing.assert_array_equal(block[0], source.read(40, 41, 0, 3, F64)[0])


def test_single_per_sample_vector_is_squeezed():
    source = open_vectors(RandomVectors(kind="random", count=1), width=4, samples=10)
    assert source.squeeze and source.count == 1


def test_basis_vectors():
    block = basis_source(5).read(0, 3, 1, 4, F64)
    np.testing.assert_array_equal(block[2], np.eye(5)[1:4])


def test_npy_vectors_shapes(tmp_path):
    np.save(tmp_path / "v3.npy", np.arange(10 * 2 * 4, dtype=float).reshape(10, 2, 4))
    source = open_vectors(NpyVectors(kind="npy", path=tmp_path / "v3.npy"), width=4, samples=10)
    assert (source.count, source.squeeze) == (2, False)
    np.testing.assert_array_equal(source.read(3, 5, 1, 2, F64)[:, 0], np.load(tmp_path / "v3.npy")[3:5, 1])
    np.save(tmp_path / "v2.npy", np.ones((10, 4)))
    assert open_vectors(NpyVectors(kind="npy", path=tmp_path / "v2.npy"), 4, 10).squeeze
    np.save(tmp_path / "shared.npy", np.ones((3, 4)))
    shared = open_vectors(NpyVectors(kind="npy", path=tmp_path / "shared.npy", shared=True), 4, 10)
    assert shared.count == 3 and shared.read(0, 7, 0, 3, F64).shape == (7, 3, 4)


@pytest.mark.parametrize(
    ("shape", "shared", "message"),
    [
        ((10, 2, 5), False, "last axis must be the vector width 4"),
        ((9, 2, 4), False, "first axis must match the 10 input samples"),
        ((2, 2, 2, 4), False, "per-sample vectors are (10, K, 4)"),
        ((10, 2, 4), True, "shared vectors are (K, 4)"),
    ],
)
def test_npy_vectors_of_the_wrong_shape_are_refused(tmp_path, shape, shared, message):
    np.save(tmp_path / "v.npy", np.ones(shape))
    with pytest.raises(ConfigError, match="vectors.path") as info:
        open_vectors(NpyVectors(kind="npy", path=tmp_path / "v.npy", shared=shared), 4, 10)
    assert message in str(info.value)


def test_non_numeric_arrays_are_refused(tmp_path):
    np.save(tmp_path / "s.npy", np.array([["a"] * 4] * 10))
    with pytest.raises(ConfigError, match="expected a real numeric dtype"):
        open_vectors(NpyVectors(kind="npy", path=tmp_path / "s.npy"), 4, 10)
