"""The planner: pure arithmetic from shapes and a memory budget to a frozen block grid.

A block is a rectangle of (samples x vectors). The store's chunk grid equals the block grid,
so every block owns whole chunks and blocks never share one. The planner never touches a
cluster, a store or a file: it can be tested with tables of expected plans.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

from jacrun.errors import ConfigError

Mode = Literal["vjp", "jvp", "jacobian"]

MIN_AUTO_ROWS = 256
"""``auto`` keeps at least this many rows per block (when N allows) before splitting vectors."""
BLOCKS_PER_WORKER = 4
"""``auto`` aims for at least this many blocks per worker, for balance and progress."""
TARGET_BLOCK_SECONDS = 1.0
"""``auto`` aims for blocks of about this long (when the kernel was timed)..."""
MIN_BLOCK_SECONDS = 0.2
"""...and never shorter than this (unless the whole job is), so per-task overhead stays small."""


ENCODE_COPIES = 3
"""Copies of a block's results while it is written: the cast to the output dtype, the encoded
chunk, and the encoded chunk with its CRC32C appended (zarr's crc32c codec makes a new buffer)."""


class PlanError(ConfigError):
    """A plan that cannot run: a block larger than the budget or a worker's memory."""


@dataclass(frozen=True)
class Plan:
    """The block grid of a job and what each block costs."""

    mode: Mode
    samples: int
    n_in: int
    n_out: int
    vectors: int
    """K: vectors per sample (the basis size in jacobian mode)."""
    strategy: Literal["rev", "fwd"] | None
    vector_dim: bool
    """Whether the result has a ``vector`` dimension."""
    samples_per_block: int
    vectors_per_block: int
    compute_itemsize: int
    output_itemsize: int
    save_outputs: bool
    memory_per_block: int
    flops_per_block: float
    task_memory: int
    worker_memory: int | None
    warnings: tuple[str, ...] = field(default=())
    seconds_per_block: float | None = None
    """Projected kernel time of one full block, from timing a small block in process."""
    workers: int = 1
    nnz: int | None = None
    """Nonzeros per sample of a sparse Jacobian (its ``vectors`` are the colours), else None."""
    sparsity: str = ""
    """For ``mode: jacobian``: dense or sparse, and why."""
    reductions: tuple[str, ...] = ()
    """Reductions over samples (``reduce``): mean, gram, norms."""
    products: bool = True
    """Whether the per-sample products are stored (``output.products``)."""

    # ---- derived -----------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        return (
            math.ceil(self.samples / self.samples_per_block),
            math.ceil(self.vectors / self.vectors_per_block),
        )

    @property
    def n_blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def result_name(self) -> str:
        return self.mode

    @property
    def result_width(self) -> int:
        """Length of the trailing axis of a vjp/jvp result."""
        return self.n_in if self.mode == "vjp" else self.n_out

    @property
    def sparse(self) -> bool:
        return self.nnz is not None

    @property
    def reverse(self) -> bool:
        """Blocks compute VJPs (``vjp``, or a Jacobian by rows), else JVPs."""
        return self.mode == "vjp" or (self.mode == "jacobian" and self.strategy == "rev")

    @property
    def result_dims(self) -> tuple[str, ...]:
        if self.nnz is not None:
            return ("sample", "nonzero")
        if self.mode == "jacobian":
            return ("sample", "output", "input")
        last = "input" if self.mode == "vjp" else "output"
        return ("sample", "vector", last) if self.vector_dim else ("sample", last)

    @property
    def result_shape(self) -> tuple[int, ...]:
        if self.nnz is not None:
            return (self.samples, self.nnz)
        if self.mode == "jacobian":
            return (self.samples, self.n_out, self.n_in)
        if self.vector_dim:
            return (self.samples, self.vectors, self.result_width)
        return (self.samples, self.result_width)

    @property
    def result_chunks(self) -> tuple[int, ...]:
        s, k = self.samples_per_block, self.vectors_per_block
        if self.nnz is not None:
            return (s, self.nnz)
        if self.mode == "jacobian":
            return (s, k, self.n_in) if self.strategy == "rev" else (s, self.n_out, k)
        return (s, k, self.result_width) if self.vector_dim else (s, self.result_width)

    @property
    def gram_width(self) -> int:
        """The side of a ``gram`` reduction: m for jvp, n otherwise."""
        return gram_width(self.mode, self.n_in, self.n_out)

    @property
    def partial_bytes(self) -> int:
        """Float64 bytes of the reductions' partial sums the store keeps until the job completes."""
        per_block = 0
        if "gram" in self.reductions:
            per_block += self.gram_width**2 * self.grid[1]
        if "mean" in self.reductions:
            per_block += math.prod(self.result_shape[1:])
        return 8 * per_block * self.grid[0]

    @property
    def output_bytes(self) -> int:
        """Uncompressed bytes of every array the job writes (once complete)."""
        total = math.prod(self.result_shape) if self.products else 0
        if self.save_outputs:
            total += self.samples * self.n_out
        total *= self.output_itemsize
        if "norms" in self.reductions:
            total += self.samples * (1 if self.mode == "jacobian" else self.vectors) * 8
        if "mean" in self.reductions:
            total += math.prod(self.result_shape[1:]) * 8
        if "gram" in self.reductions:
            total += 2 * self.gram_width * (self.gram_width + 1) * 8  # Gram, eigenvectors and values
        return total

    @property
    def estimated_seconds(self) -> float | None:
        """Projected wall time of the whole job's kernels on ``workers`` workers."""
        if self.seconds_per_block is None:
            return None
        waves = math.ceil(self.n_blocks / max(self.workers, 1))
        return waves * self.seconds_per_block

    @property
    def total_flops(self) -> float:
        return self.flops_per_block * self.n_blocks

    def block_rows(self, i: int) -> tuple[int, int]:
        """Sample range [start, stop) of sample-block ``i``."""
        start = i * self.samples_per_block
        return start, min(start + self.samples_per_block, self.samples)

    def block_vectors(self, j: int) -> tuple[int, int]:
        """Vector range [start, stop) of vector-block ``j``."""
        start = j * self.vectors_per_block
        return start, min(start + self.vectors_per_block, self.vectors)

    def to_dict(self) -> dict:
        """JSON-able summary for the store's attributes."""
        data = asdict(self)
        data.update(
            grid=list(self.grid),
            n_blocks=self.n_blocks,
            result_shape=list(self.result_shape),
            result_chunks=list(self.result_chunks),
            result_dims=list(self.result_dims),
            output_bytes=self.output_bytes,
            warnings=list(self.warnings),
        )
        if math.isnan(data["flops_per_block"]):
            data["flops_per_block"] = None
        data["estimated_seconds"] = self.estimated_seconds
        return data


WorkModel = Callable[[int, int], float]
"""(rows, vectors) -> bytes or FLOPs of one kernel call."""


def block_memory(
    rows: int,
    k: int,
    *,
    mode: Mode,
    n_in: int,
    n_out: int,
    strategy: str | None,
    shared_vectors: bool,
    compute_itemsize: int,
    output_itemsize: int,
    save_outputs: bool,
    work_bytes: WorkModel,
    nnz: int | None = None,
    reductions: tuple[str, ...] = (),
) -> int:
    """Projected peak bytes of one block: inputs, vectors, kernel work, results, casts, encoding.

    For a sparse Jacobian (``nnz``), the result is the nonzeros (rows, nnz); the compressed
    products of each kernel call are part of ``work_bytes``.
    """
    c, o = compute_itemsize, output_itemsize
    products = rows * (nnz if nnz is not None else k * max(n_in, n_out))
    extra = _reduction_bytes(rows, k, products, c, mode, n_in, n_out, reductions, sparse=nnz is not None)
    if nnz is not None:  # the nonzeros; the seeds are counted in work_bytes
        vectors, result = 0, rows * nnz
    else:
        if mode == "vjp":
            vec_width, res_width = n_out, n_in
        elif mode == "jvp":
            vec_width, res_width = n_in, n_out
        else:
            vec_width, res_width = (n_out, n_in) if strategy == "rev" else (n_in, n_out)
        vectors = (k if shared_vectors else rows * k) * vec_width * c
        result = rows * k * res_width
    memory = rows * n_in * c + vectors + rows * n_out * c + result * c
    memory += int(work_bytes(rows, k))
    if nnz is None and mode == "jacobian" and strategy == "fwd":
        memory += result * c  # the transposed copy written to the store
    memory += result * o * ENCODE_COPIES + (rows * n_out * o * ENCODE_COPIES if save_outputs else 0)
    memory += result  # the finiteness mask
    return memory + extra


def gram_width(mode: Mode, n_in: int, n_out: int) -> int:
    """The side of a ``gram`` reduction: m for jvp (J J^T), n for vjp and jacobian (J^T J)."""
    return n_out if mode == "jvp" else n_in


def _reduction_bytes(
    rows: int,
    k: int,
    products: int,
    itemsize: int,
    mode: Mode,
    n_in: int,
    n_out: int,
    reductions,
    sparse: bool = False,
) -> int:
    """What reductions add to a block: a float64 copy of float32 products (mean, gram), the
    Gram's partial (and a product's temporary), the mean's partial and the norms; for a sparse
    Jacobian's Gram, the block's Jacobians as one CSR matrix and its transpose (column indices
    and values, twice: 32 bytes a nonzero)."""
    if not reductions:
        return 0
    extra = rows * k * 8
    if {"mean", "gram"} & set(reductions):
        extra += (products * 8 if itemsize != 8 else 0) + products // max(rows, 1) * 8
    if "gram" in reductions:
        width = gram_width(mode, n_in, n_out)
        extra += 2 * width * width * 8 + (products * 32 if sparse else 0)
    return extra


def _timed(seconds_per_row: Callable[[int, int], float] | None, k: int, most: int) -> float | None:
    """Seconds per row with ``k`` vectors, timed on at most ``most`` rows (a block's), or None
    when untimed (0: the timing failed)."""
    per_row = seconds_per_row(k, most) if seconds_per_row is not None else None
    return per_row if per_row and per_row > 0 else None


def make_plan(
    *,
    mode: Mode,
    samples: int,
    n_in: int,
    n_out: int,
    vectors: int,
    vector_dim: bool,
    shared_vectors: bool,
    strategy: Literal["rev", "fwd"] | None,
    compute_itemsize: int,
    output_itemsize: int,
    save_outputs: bool,
    chunk_samples: int | Literal["auto"],
    chunk_vectors: int | Literal["auto"],
    task_memory: int,
    worker_memory: int | None,
    workers: int,
    work_bytes: WorkModel,
    flops: WorkModel,
    seconds_per_row: Callable[[int, int], float] | None = None,
    nnz: int | None = None,
    sparsity: str = "",
    reductions: tuple[str, ...] = (),
    products: bool = True,
) -> Plan:
    """Choose the block shape and project its cost; raise PlanError when it cannot fit.

    ``seconds_per_row(k, most)`` (from timing at most ``most`` rows) lets ``auto`` aim for blocks of about
    TARGET_BLOCK_SECONDS; without it, ``auto`` uses memory and balance alone. A sparse
    Jacobian (``nnz`` nonzeros per sample, ``vectors`` colours) runs all its colours in
    every block: its nonzeros need every colour.
    """
    if samples <= 0 or vectors <= 0 or n_in <= 0 or n_out <= 0:
        raise PlanError(f"empty job: samples={samples}, vectors={vectors}, n_in={n_in}, n_out={n_out}")
    if nnz is not None or (mode == "jacobian" and reductions):
        if chunk_vectors not in ("auto", vectors):
            why = (
                f"a sparse Jacobian computes all its {vectors} colours"
                if nnz is not None
                else (f"reductions of Jacobians need all {vectors} basis vectors")
            )
            raise PlanError(
                f"chunks.vectors: {why} in every block; remove chunks.vectors (or set it to auto)"
            )
        chunk_vectors = vectors
    if "gram" in reductions:
        width = gram_width(mode, n_in, n_out)
        size = 8 * width * width
        if 3 * size > task_memory:
            raise PlanError(
                f"reduce: gram of {width}-wide products is a {width} x {width} float64 matrix "
                f"({fmt_bytes(size)}); a block holds it and its partial, over chunks.task_memory "
                f"({fmt_bytes(task_memory)}): use norms, raise chunks.task_memory, or reduce fewer "
                "dimensions"
            )

    def memory(rows: int, k: int) -> int:
        return block_memory(
            rows,
            k,
            mode=mode,
            n_in=n_in,
            n_out=n_out,
            strategy=strategy,
            shared_vectors=shared_vectors,
            compute_itemsize=compute_itemsize,
            output_itemsize=output_itemsize,
            save_outputs=save_outputs,
            work_bytes=work_bytes,
            nnz=nnz,
            reductions=reductions,
        )

    budget = task_memory
    k = vectors if chunk_vectors == "auto" else min(chunk_vectors, vectors)
    if chunk_vectors == "auto":
        floor_rows = min(samples, MIN_AUTO_ROWS) if chunk_samples == "auto" else min(chunk_samples, samples)
        while k > 1 and memory(floor_rows, k) > budget:
            k = math.ceil(k / 2)
    if chunk_samples == "auto":
        rows = _rows_within(memory, k, budget, samples)
        if rows == 0:
            raise PlanError(
                f"chunks.task_memory: {fmt_bytes(budget)} is too small: one sample with "
                f"{k} vector(s) needs {fmt_bytes(memory(1, k))}"
            )
        balanced = max(MIN_AUTO_ROWS, math.ceil(samples / (BLOCKS_PER_WORKER * max(workers, 1))))
        per_row = _timed(seconds_per_row, k, rows)
        if per_row is not None:
            rows = min(rows, max(1, int(TARGET_BLOCK_SECONDS / per_row)))
            balanced = max(balanced, math.ceil(MIN_BLOCK_SECONDS / per_row))
        rows = _even_rows(min(rows, balanced, samples), samples)
    else:
        rows = min(chunk_samples, samples)
        per_row = _timed(seconds_per_row, k, rows)  # for the estimate only
    projected = memory(rows, k)
    warnings: list[str] = []
    if worker_memory is not None and projected > 0.8 * worker_memory:
        raise PlanError(
            f"chunks: a block of {rows} samples x {k} vectors needs about {fmt_bytes(projected)}, "
            f"more than 80% of a worker's memory limit ({fmt_bytes(worker_memory)}); "
            "use smaller chunks.samples / chunks.vectors or a larger cluster.memory_limit"
        )
    if projected > budget:
        warnings.append(
            f"a block needs about {fmt_bytes(projected)}, over chunks.task_memory ({fmt_bytes(budget)})"
        )
    return Plan(
        mode=mode,
        samples=samples,
        n_in=n_in,
        n_out=n_out,
        vectors=vectors,
        strategy=strategy,
        vector_dim=vector_dim,
        samples_per_block=rows,
        vectors_per_block=k,
        compute_itemsize=compute_itemsize,
        output_itemsize=output_itemsize,
        save_outputs=save_outputs,
        memory_per_block=projected,
        flops_per_block=float(flops(rows, k)),
        task_memory=budget,
        worker_memory=worker_memory,
        warnings=tuple(warnings),
        seconds_per_block=None if per_row is None else per_row * rows,
        workers=workers,
        nnz=nnz,
        sparsity=sparsity,
        reductions=tuple(reductions),
        products=products,
    )


def _even_rows(cap: int, samples: int) -> int:
    """Rows per block for blocks of equal size (no ragged sliver), at most ``cap``.

    Rounded up to a multiple of 64 (friendlier to BLAS and to chunk sizes) when that still
    fits the cap and adds no block.
    """
    blocks = math.ceil(samples / cap)
    rows = math.ceil(samples / blocks)
    rounded = math.ceil(rows / 64) * 64
    return rounded if rows >= 64 and rounded <= cap else rows


def _rows_within(memory: Callable[[int, int], int], k: int, budget: int, samples: int) -> int:
    """Largest row count in [0, samples] whose block fits ``budget`` (memory grows with rows)."""
    if memory(1, k) > budget:
        return 0
    lo, hi = 1, samples
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory(mid, k) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
