"""Library entry points, re-exported by ``jacrun``: plan, submit, load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jacrun.config import JobConfig, load_config
from jacrun.plan import Plan


def _config(config: JobConfig | str | Path) -> JobConfig:
    return config if isinstance(config, JobConfig) else load_config(config)


def plan(config: JobConfig | str | Path) -> Plan:
    """The job's frozen Plan (block grid, projected memory, FLOPs and runtime estimate); starts
    and writes nothing."""
    from jacrun.prepare import prepare

    return prepare(_config(config), estimate=True).plan


def submit(config: JobConfig | str | Path, **options: Any):
    """Run a job; see :func:`jacrun.runner.submit` for options. Returns a Summary."""
    from jacrun.runner import submit as run

    return run(_config(config), **options)


def check_job(config: JobConfig | str | Path, *, samples: int = 8, vectors: int = 2, seed: int = 0):
    """Gradient checks of a job's function on the first ``samples`` rows of its inputs.

    Returns a list of :class:`jacrun.checks.CheckReport` (a float32 function gets a float64
    recheck). A sparse Jacobian job also gets a report on its decompressed nonzeros against
    the function's JVPs and VJPs (and the dense Jacobian where it is small). Starts no cluster
    and writes nothing.
    """
    import numpy as np

    from jacrun.checks import check_sparse, check_spec
    from jacrun.errors import ConfigError
    from jacrun.prepare import build, resolve_sparsity, sized_function
    from jacrun.sources import open_input_file, open_inputs

    config = _config(config)
    opened = open_input_file(config.inputs)
    function = build(config, opened)
    inputs = open_inputs(config.inputs, function.n_in, opened)
    rows = min(max(samples, 2), inputs.shape[0])
    if rows < 2:
        raise ConfigError("check: the inputs need at least 2 samples")
    x = inputs.read(0, rows, np.dtype("float64"))
    if not np.isfinite(x).all():
        raise ConfigError(f"check: the first {rows} input samples contain non-finite values")
    reports = check_spec(
        sized_function(config, opened), x, vectors=vectors, seed=seed
    )  # n_in from a file too
    sparse = resolve_sparsity(config, function)[0] if config.mode == "jacobian" else None
    if sparse is not None:
        reports.append(check_sparse(function, sparse, x, vectors=vectors, seed=seed))
    return reports


def load(store: str | Path, **options: Any):
    """Open a job's store as a lazy xarray Dataset; warns if the job is incomplete."""
    from jacrun.store import load as open_store

    return open_store(store, **options)


def _sparse_store(store: str | Path):
    """(the store's SparseJacobian, its sample count); ConfigError for a dense store."""
    from jacrun.errors import ConfigError
    from jacrun.sparsity import SparseJacobian
    from jacrun.store import read_attrs, read_pattern

    attrs = read_attrs(store)
    info = attrs.get("sparsity")
    if not info:
        raise ConfigError(f"{store}: holds no sparse Jacobian (mode {attrs.get('mode')}, dense)")
    if not attrs["config"]["output"].get("products", True):
        raise ConfigError(f"{store}: keeps no per-sample Jacobians (output.products: false), only reductions")
    arrays = read_pattern(store)
    sparse = SparseJacobian(
        shape=tuple(info["shape"]),
        indptr=arrays["indptr"],
        indices=arrays["indices"],
        colours=arrays["colours"],
        direction=info["mode"],
        source=info.get("source", ""),
    )
    return sparse, int(attrs["plan"]["samples"])


def jacobian(store: str | Path, sample: int):
    """One sample's Jacobian from a sparse Jacobian store, as a ``scipy.sparse.csr_array`` (m, n)."""
    from jacrun.errors import ConfigError
    from jacrun.store import read_rows

    sparse, samples = _sparse_store(store)
    if not 0 <= sample < samples:
        raise ConfigError(f"sample {sample} is out of range: the store holds samples 0..{samples - 1}")
    return sparse.csr(read_rows(store, "jacobian", sample, sample + 1)[0])


def jacobians(store: str | Path, start: int = 0, stop: int | None = None, *, dense: bool = False):
    """Samples start:stop of a sparse Jacobian store: a pydata ``sparse.COO`` array
    (samples, m, n), or with ``dense=True`` a NumPy array (refused when over 1 GiB)."""
    import numpy as np

    from jacrun.errors import ConfigError
    from jacrun.store import read_rows

    sparse, samples = _sparse_store(store)
    stop = samples if stop is None else min(stop, samples)
    if not 0 <= start < stop:
        raise ConfigError(f"samples {start}:{stop} are empty or out of range 0..{samples}")
    values = read_rows(store, "jacobian", start, stop)
    count, (m, n) = stop - start, sparse.shape
    if dense:
        size = count * m * n * values.dtype.itemsize
        if size > DENSE_LIMIT:
            raise ConfigError(
                f"samples {start}:{stop} as dense arrays would take {size / 2**30:.1f} GiB; "
                "ask for fewer samples, or the sparse form"
            )
        out = np.zeros((count, m, n), values.dtype)
        out[:, sparse.rows, sparse.indices] = values
        return out
    try:
        import sparse as pydata_sparse
    except ImportError:
        raise ConfigError("jacobians() returns pydata sparse arrays: pip install 'jacrun[sparse]'") from None
    coords = np.stack(
        [np.repeat(np.arange(count), sparse.nnz), np.tile(sparse.rows, count), np.tile(sparse.indices, count)]
    )
    return pydata_sparse.COO(coords, values.ravel(), shape=(count, m, n), sorted=True, has_duplicates=False)


DENSE_LIMIT = 1 << 30
"""Largest dense batch :func:`jacobians` returns."""
