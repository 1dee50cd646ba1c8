"""Everything known about a job before any cluster starts or store is touched.

``prepare(config)`` builds the function, opens the input and vector readers (checking their
shapes against the function) and plans the block grid. Any problem is a ConfigError.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from jacrun.cluster import blas_threads
from jacrun.config import AddressClusterConfig, JobConfig, OutputConfig
from jacrun.errors import ConfigError
from jacrun.functions import Function, build_function, resolve_strategy
from jacrun.functions.base import Mode, Strategy, block_kernel
from jacrun.functions.parallel import blas_limit
from jacrun.plan import Plan, PlanError, make_plan
from jacrun.reduce import Reducer
from jacrun.sources import (
    ArrayRows,
    RandomRows,
    VectorSource,
    basis_source,
    open_input_file,
    open_inputs,
    open_vectors,
    seed_source,
    unreadable,
)
from jacrun.sparsity import SparseJacobian


@dataclass(frozen=True)
class PreparedJob:
    """A validated job: config, function, readers and plan. Picklable, sent to every block."""

    config: JobConfig
    function: Function
    inputs: RandomRows | ArrayRows
    vectors: VectorSource
    plan: Plan
    sparse: SparseJacobian | None = None
    """The pattern and colouring of a sparse Jacobian job (``plan.nnz`` set), else None."""
    reducer: Reducer | None = None
    """The job's reductions over samples (``reduce``), else None."""

    @property
    def config_hash(self) -> str:
        return self.config.content_hash()


def _check_array_files(spec) -> None:
    """Refuse a function's .npy/.npz file (weights, matrix, bias) that NumPy cannot read."""
    for name in sorted(spec.model_fields_set):
        path = getattr(spec, name)
        if not isinstance(path, Path) or path.suffix not in {".npy", ".npz"} or not path.is_file():
            continue
        try:
            with contextlib.ExitStack() as stack:
                data = np.load(path, mmap_mode="r", allow_pickle=False)
                if hasattr(data, "close"):
                    stack.callback(data.close)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the user's file
            raise ConfigError(f"function.{name}: cannot read {path}: {unreadable(exc)}") from None


def sized_function(config: JobConfig, opened: ArrayRows | RandomRows | None):
    """The function section to build: an ``autodiff`` section without ``n_in`` takes it from
    the inputs' file (``opened`` by :func:`open_input_file`; on a worker, the job's inputs),
    whose width fixes it; given both, they must agree."""
    spec, inputs = config.function, config.inputs
    if getattr(spec, "autodiff", None) is None or not isinstance(opened, ArrayRows):
        return spec
    shape = opened.shape
    if len(shape) != 2:
        return spec  # open_inputs says what is wrong with it
    if spec.n_in is None:
        return spec.model_copy(update={"n_in": shape[1]})
    if spec.n_in != shape[1]:
        raise ConfigError(
            f"function.n_in: {spec.n_in}, but inputs.path {inputs.path} has {shape[1]} columns "
            f"(shape {shape}); set n_in: {shape[1]}, or leave n_in out to take it from the inputs"
        )
    return spec


def build(config: JobConfig, opened: ArrayRows | RandomRows | None = None) -> Function:
    """The job's function (sized by the inputs' file ``opened``, if any); a build failure is the
    user's config problem."""
    _check_array_files(config.function)
    spec = sized_function(config, opened)
    try:
        return build_function(spec)
    except (ValueError, TypeError, OSError, KeyError) as exc:
        # "weights file w.npz: W0 has shape ..." is about function.weights (matrix, bias, target)
        message = str(exc)
        first = message.split(" ", 1)[0]
        given = config.function.model_fields_set - {"kind"}
        head, colon, rest = message.partition(": ")
        if colon and "." in head and head.split(".")[0] in given:  # "fd.bounds: ..." names its key
            raise ConfigError(f"function.{head}: {rest}") from None
        key = f"function.{first}" if first in given else "function"
        raise ConfigError(f"{key}: {exc}") from None


def block_timer(
    function: Function,
    inputs,
    vectors: VectorSource,
    reverse: bool,
    blas_threads: int,
    output: OutputConfig | None = None,
    sparse: SparseJacobian | None = None,
):
    """``seconds_per_row(k, most)``: a block's work timed in process on a few rows (more while
    the kernel is fast, never more than ``most``, the rows a block may hold), cached: reading
    or generating x and the vectors, the kernel (for a sparse Jacobian, its compressed
    products and the gather), and, given ``output``, encoding the results with its codec in
    memory (the disk write is not timed).

    Timed with the BLAS thread count a worker thread will have, and on no more rows than a
    block's (larger calls cost more per row: fresh pages, arrays beyond the caches), so the
    estimate is a worker's.
    """
    from threadpoolctl import threadpool_limits

    from jacrun.store import encode_seconds

    kernel = block_kernel(function, reverse, sparse, output is None or output.save_outputs)
    cache: dict[tuple[int, int], float] = {}

    def read(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return inputs.read(0, rows, function.dtype), vectors.read(0, rows, 0, k, function.dtype)

    def seconds_per_row(k: int, most: int) -> float:
        most = max(1, min(most, inputs.shape[0]))
        if (k, most) not in cache:
            elapsed, rows = 0.0, 1
            with threadpool_limits(limits=blas_threads), contextlib.suppress(Exception):
                for size in (8, 128, 1024):
                    rows = min(size, most)
                    elapsed, (y, result) = _best_of(kernel, *read(rows, k), repeats=2)
                    if elapsed > CALIBRATION_SECONDS or rows == most:
                        break
                elapsed += _best_of(read, rows, k, repeats=2)[0]
                if output is not None:
                    written = [result, y] if output.save_outputs else [result]
                    dtype = output.dtype or str(function.dtype)
                    elapsed += encode_seconds(written, output.compression, dtype)
            cache[k, most] = elapsed / rows
        return cache[k, most]

    return seconds_per_row


def sample_results(job: PreparedJob, rows: int) -> list[np.ndarray]:
    """What a block writes for the job's first ``rows`` samples and first vector block, in the
    output dtype (the results, and y when saved): a sample of the store's contents."""
    plan, function = job.plan, job.function
    rows = min(rows, plan.samples)
    kernel = block_kernel(function, plan.reverse, job.sparse, plan.save_outputs)
    x = job.inputs.read(0, rows, function.dtype)
    y, result = kernel(x, job.vectors.read(0, rows, 0, plan.vectors_per_block, function.dtype))
    written = [result] + ([y] if plan.save_outputs and y is not None else [])
    return [values.astype(job.config.output_dtype, copy=False) for values in written]


CALIBRATION_SECONDS = 0.02
"""Time 8 rows first; while a timing is faster than this, time again on 16x more rows."""


def _best_of(run, *args, repeats: int) -> tuple[float, object]:
    """(fastest of ``repeats`` calls in seconds, the last call's return value)."""
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = run(*args)
        best = min(best, time.perf_counter() - start)
    return best, value


def _located(prepare_job):
    """Give a ConfigError raised after loading (``inputs.path: ... has shape ...``) the config
    file and YAML line of its key (``job.yaml:9: inputs.path: ...``), see ``JobConfig.locate``."""

    @functools.wraps(prepare_job)
    def wrapper(config: JobConfig, *args, **kwargs) -> PreparedJob:
        try:
            return prepare_job(config, *args, **kwargs)
        except ConfigError as exc:
            exc.args = (config.locate(str(exc)), *exc.args[1:])
            raise

    return wrapper


@_located
def prepare(
    config: JobConfig,
    function: Function | None = None,
    calibrate: bool = True,
    estimate: bool = False,
    sparse: SparseJacobian | None = None,
) -> PreparedJob:
    """Build, open, check and plan; raise ConfigError on any mismatch.

    ``calibrate`` times a block's work on a few rows (inputs, kernel, encoding; see
    :func:`block_timer`) so ``auto`` chunks aim for ~1 s blocks and the plan can estimate the
    runtime (a kernel that raises here is left to fail, with a clear
    message, in its block). With explicit ``chunks.samples`` it times only when ``estimate``
    asks for the runtime estimate (``jacrun plan``): submitting does not need it. ``sparse``
    replaces the colouring of a sparse Jacobian job (a resumed job reuses its store's).
    """
    opened = open_input_file(config.inputs)  # the inputs' file, opened once
    function = function or build(config, opened)
    inputs = open_inputs(config.inputs, function.n_in, opened)
    samples = inputs.shape[0]
    _check_domain(function, inputs)
    strategy = None
    note = ""
    if config.mode == "jacobian":
        if sparse is None:
            sparse, note = resolve_sparsity(config, function)
        else:
            note = f"sparse: {sparse.n_colours} colours ({sparse.direction}), the stored colouring"
        if sparse is not None:
            strategy = sparse.direction
            vectors = seed_source(sparse)
        else:
            strategy = resolve_strategy(job_strategy(config, function), function.n_in, function.n_out)
            vectors = basis_source(function.n_out if strategy == "rev" else function.n_in)
    else:
        width = function.n_out if config.mode == "vjp" else function.n_in
        vectors = open_vectors(config.vectors, width, samples)
    kernel_mode = config.mode if config.mode != "jacobian" else ("vjp" if strategy == "rev" else "jvp")
    timer = None
    if calibrate and (config.chunks.samples == "auto" or estimate):
        timer = block_timer(
            function,
            inputs,
            vectors,
            kernel_mode == "vjp",
            blas_threads(config.cluster),
            config.output,
            sparse,
        )
    with blas_limit(blas_threads(config.cluster)):  # work_bytes counts a worker's kernel threads
        try:
            plan = _plan(config, function, samples, vectors, strategy, kernel_mode, timer, sparse, note)
        except PlanError as exc:
            if config.mode != "jacobian" or sparse is not None:
                raise
            raise PlanError(f"{exc}; {DENSE_ADVICE}") from None
    notes = function.plan_notes(config.mode, sparse)
    if notes:
        plan = replace(plan, warnings=plan.warnings + tuple(notes))
    reducer = None
    if config.reduce:
        probes = config.vectors is not None and config.vectors.kind == "random"
        reducer = Reducer(tuple(config.reduce), plan, probes, sparse)
    return PreparedJob(config, function, inputs, vectors, plan, sparse, reducer)


DOMAIN_CHECK_BYTES = 16 << 20
"""``prepare`` checks the first rows of the inputs, about this much, against the function's
domain (``fd.bounds``); every block checks its own rows."""


def _check_domain(function: Function, inputs) -> None:
    """The first input rows inside the function's domain, for a function that has one."""
    if type(function).check_inputs is Function.check_inputs:
        return
    rows = min(inputs.shape[0], max(1, DOMAIN_CHECK_BYTES // (8 * function.n_in)))
    try:
        function.check_inputs(inputs.read(0, rows, function.dtype))
    except ValueError as exc:
        raise ConfigError(f"function.{exc} (the inputs must lie inside the bounds)") from None


def job_strategy(config: JobConfig, function: Function) -> Strategy:
    """``strategy``, or ``fwd`` for a function without a reverse mode (finite differences),
    whose Jacobians are computed column by column; ``rev`` is refused for it."""
    if function.reverse or config.strategy == "fwd":
        return config.strategy
    if config.strategy == "rev":
        raise ConfigError(
            "strategy: rev needs a reverse mode; finite differences (autodiff: fd) have none and "
            "compute Jacobians column by column: use fwd or auto"
        )
    return "fwd"


DENSE_ADVICE = (
    "a dense Jacobian stores all m x n entries per sample: if most are structurally zero, "
    "set sparsity (auto with a function that declares its pattern, or {file: pattern.npz})"
)


def resolve_sparsity(config: JobConfig, function: Function) -> tuple[SparseJacobian | None, str]:
    """The job's pattern and colouring (None for a dense Jacobian), and why, for ``jacrun plan``.

    ``auto`` is sparse when the function declares a pattern whose colouring needs fewer
    products than the dense strategy; ``dense`` never; a pattern file or ``detect`` always.
    """
    from jacrun import sparsity as sp

    m, n = function.n_out, function.n_in
    strategy = job_strategy(config, function)
    dense_strategy = resolve_strategy(strategy, n, m)
    dense_products = m if dense_strategy == "rev" else n
    setting = config.sparsity
    if setting == "dense":
        return None, f"dense ({dense_strategy}): sparsity: dense"
    if setting == "auto":
        pattern = function.sparsity()
        if pattern is None:
            return None, f"dense ({dense_strategy}): the function declares no sparsity pattern"
        if isinstance(pattern, str) and pattern == "dense":
            return None, f"dense ({dense_strategy}): the declared pattern is dense"
        try:
            pattern = sp.as_pattern(pattern, (m, n))
        except ValueError as exc:
            raise ConfigError(f"function: its declared sparsity pattern {exc}") from None
        if pattern.nnz == m * n:
            return None, f"dense ({dense_strategy}): the declared pattern is dense"
        sparse = sp.choose(pattern, strategy, "declared")
        if sparse.n_colours >= dense_products:
            return None, (
                f"dense ({dense_strategy}): colouring the declared pattern needs {sparse.n_colours} "
                f"products, no fewer than the dense {dense_products}"
            )
        return sparse, _sparse_note(sparse, dense_products, "the declared pattern")
    if setting == "detect":
        sparse = sp.choose(_detected(config, function), strategy, "detected")
        return sparse, _sparse_note(sparse, dense_products, "the detected pattern")
    try:
        pattern = sp.read_pattern_file(setting.file, (m, n))
    except ValueError as exc:
        raise ConfigError(f"sparsity.file: {exc}") from None
    sparse = sp.choose(pattern, strategy, "file")
    return sparse, _sparse_note(sparse, dense_products, f"the pattern in {setting.file.name}")


def _sparse_note(sparse: SparseJacobian, dense_products: int, where: str) -> str:
    return (
        f"sparse ({sparse.direction}): {where} needs {sparse.n_colours} products per sample "
        f"instead of {dense_products}; coloured in {sparse.colouring_seconds:.2g} s by {sparse.colouring}"
    )


def _detected(config: JobConfig, function: Function):
    """The pattern asdex detects in a ``kind: python`` target with ``autodiff: jax``."""
    import importlib.util

    if getattr(config.function, "autodiff", None) != "jax" or not hasattr(function, "detect_sparsity"):
        raise ConfigError(
            "sparsity: detect works for kind: python functions with autodiff: jax; for this "
            "function give sparsity: {file: pattern.npz} (scipy.sparse.save_npz) or declare "
            "Function.sparsity()"
        )
    if importlib.util.find_spec("asdex") is None:
        raise ConfigError("sparsity: detect needs asdex: pip install 'jacrun[detect]'")
    try:
        return function.detect_sparsity()
    except Exception as exc:  # noqa: BLE001 - the user's function could not be traced
        detail = f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"sparsity: asdex could not detect the pattern: {detail}") from None


def _plan(
    config: JobConfig,
    function: Function,
    samples: int,
    vectors: VectorSource,
    strategy: str | None,
    kernel_mode: Mode,
    timer: Callable[[int], float] | None,
    sparse: SparseJacobian | None,
    note: str,
) -> Plan:
    cluster = config.cluster
    work_bytes = lambda rows, k: function.work_bytes(rows, k, kernel_mode)  # noqa: E731
    if sparse is not None:
        work_bytes = lambda rows, k: sparse.work_bytes(function, rows)  # noqa: E731
    workers = 1 if isinstance(cluster, AddressClusterConfig) else cluster.workers
    worker_memory = None if isinstance(cluster, AddressClusterConfig) else int(cluster.memory_limit)
    return make_plan(
        mode=config.mode,
        samples=samples,
        n_in=function.n_in,
        n_out=function.n_out,
        vectors=vectors.count,
        vector_dim=not vectors.squeeze,
        shared_vectors=vectors.shared,
        strategy=strategy,
        compute_itemsize=np.dtype(config.compute_dtype).itemsize,
        output_itemsize=np.dtype(config.output_dtype).itemsize,
        save_outputs=config.output.save_outputs,
        chunk_samples=config.chunks.samples,
        chunk_vectors=config.chunks.vectors,
        task_memory=int(config.chunks.task_memory),
        worker_memory=worker_memory,
        workers=workers,
        work_bytes=work_bytes,
        flops=lambda rows, k: function.flops(rows, k, kernel_mode),
        seconds_per_row=timer,
        nnz=None if sparse is None else sparse.nnz,
        sparsity=note,
        reductions=tuple(config.reduce),
        products=config.output.products,
    )
