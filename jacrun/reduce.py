"""Reductions over samples: mean products, Gram matrices, per-sample norms, in float64.

A job's product of sample i, P_i, is its (K, n) VJPs (``vjp``), its (K, m) JVPs (``jvp``) or its
Jacobian J_i (m, n) (``jacobian``; dense or sparse):

=====  ======================================================================================
mean   (1/N) sum_i P_i, the shape of one sample's product (a sparse Jacobian: its nonzeros)
gram   (1/N) sum_i P_i^T P_i: (n, n) for vjp and jacobian, (m, m) for jvp; divided by K too
       when the vectors are random probes (E[v v^T] = I), so it estimates E[J^T J] (vjp) or
       E[J J^T] (jvp). With ``vectors: ones`` and a scalar f it is E[grad f grad f^T], the
       active-subspace matrix; with basis vectors it is exactly the mean of J^T J (J J^T).
norms  the Euclidean norm of every product (N, K), or the Frobenius norm of every J_i (N,)
=====  ======================================================================================

Each block turns its products into *partials* (:meth:`Reducer.partials`): sums over its samples,
in float64 whatever the compute dtype, with the Gram's matrix product on one BLAS thread, so the
same block gives the same bits on any worker. The store keeps every block's partials until the
last block is done; :func:`combine` then adds them in block order, so for a given block size a
result is bit-identical for any worker count, order of execution or resume, and agrees across
block sizes to rounding.

This module imports neither dask nor zarr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from jacrun.plan import Plan
    from jacrun.sparsity import SparseJacobian

Reduction = Literal["mean", "gram", "norms"]


@dataclass(frozen=True, eq=False)
class Reducer:
    """The reductions of one job and the shapes they take from its plan."""

    names: tuple[Reduction, ...]
    plan: Plan
    probes: bool
    """The vectors are random probes: the Gram is divided by K."""
    sparse: SparseJacobian | None = None

    # ---- shapes ------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """The side of the Gram: n for vjp and jacobian, m for jvp."""
        return self.plan.gram_width

    @property
    def gram_dims(self) -> tuple[str, str]:
        side = "output" if self.plan.mode == "jvp" else "input"
        return (side, f"{side}2")

    @property
    def product_shape(self) -> tuple[int, ...]:
        """One sample's product, as ``mean`` stores it."""
        return self.plan.result_shape[1:]

    @property
    def product_dims(self) -> tuple[str, ...]:
        return self.plan.result_dims[1:]

    @property
    def norms_shape(self) -> tuple[int, ...]:
        plan = self.plan
        if plan.mode == "jacobian" or not plan.vector_dim:
            return (plan.samples,)
        return (plan.samples, plan.vectors)

    @property
    def norms_dims(self) -> tuple[str, ...]:
        return ("sample",) if len(self.norms_shape) == 1 else ("sample", "vector")

    @property
    def norms_chunks(self) -> tuple[int, ...]:
        plan = self.plan
        return (plan.samples_per_block, plan.vectors_per_block)[: len(self.norms_shape)]

    # ---- partials ----------------------------------------------------------------------------

    def partials(self, result: np.ndarray) -> dict[str, np.ndarray]:
        """Float64 partials of one block's products: ``result`` as a block computes it, (rows, k,
        width) or a sparse Jacobian's nonzeros (rows, nnz). ``norms`` are per sample."""
        out: dict[str, np.ndarray] = {}
        plan = self.plan
        if {"mean", "gram"} & set(self.names):
            wide = result.astype(np.float64, copy=False)
        if "mean" in self.names:
            total = wide.sum(axis=0)
            if plan.mode == "jacobian" and plan.strategy == "fwd" and not plan.sparse:
                total = total.T  # the block holds columns of J
            elif plan.mode != "jacobian" and not plan.vector_dim:
                total = total[0]
            out["mean"] = total
        if "gram" in self.names:
            out["gram"] = self._gram(wide)
        if "norms" in self.names:  # summed in float64, without a float64 copy of the products
            if plan.mode == "jacobian":
                flat = result.reshape(result.shape[0], -1)
                out["norms"] = np.sqrt(np.einsum("bp,bp->b", flat, flat, dtype=np.float64))
            else:
                out["norms"] = np.sqrt(np.einsum("bkw,bkw->bk", result, result, dtype=np.float64))
                if not plan.vector_dim:
                    out["norms"] = out["norms"][:, 0]
        return out

    def _gram(self, wide: np.ndarray) -> np.ndarray:
        from jacrun.functions.parallel import one_blas_thread

        plan = self.plan
        if self.sparse is not None:  # the block's Jacobians stacked as one CSR matrix (rows * m, n)
            import scipy.sparse as sp

            batch, (m, n), nnz = wide.shape[0], self.sparse.shape, self.sparse.nnz
            indptr = np.append(
                (np.arange(batch)[:, None] * nnz + self.sparse.indptr[None, :-1]).ravel(), batch * nnz
            )
            stacked = sp.csr_array(
                (wide.ravel(), np.tile(self.sparse.indices, batch), indptr), shape=(batch * m, n)
            )
            return (stacked.T @ stacked).toarray()
        if plan.mode == "jacobian" and plan.strategy == "fwd":
            rows = wide.transpose(0, 2, 1).reshape(-1, plan.n_in)  # the rows of every J_i
        else:
            rows = wide.reshape(-1, wide.shape[-1])
        with one_blas_thread():  # the same bits on any worker, whatever its BLAS threads
            return rows.T @ rows

    # ---- the result --------------------------------------------------------------------------

    def finish(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Final results from the partials summed over every block: means, and the Gram with its
        eigenvalues and eigenvectors (descending)."""
        samples = self.plan.samples
        out: dict[str, np.ndarray] = {}
        if "mean" in sums:
            out["mean"] = sums["mean"] / samples
        if "gram" in sums:
            scale = samples * (self.plan.vectors if self.probes else 1)
            gram = sums["gram"] / scale
            gram = (gram + gram.T) / 2  # exactly symmetric
            out["gram"] = gram
            if np.isfinite(gram).all():
                values, vectors = np.linalg.eigh(gram)
                order = np.argsort(values)[::-1]
                values, vectors = values[order], vectors[:, order]
            else:  # nan_policy: propagate let a non-finite product in
                values, vectors = np.full(gram.shape[0], np.nan), np.full(gram.shape, np.nan)
            out["gram_eigenvalues"] = values
            out["gram_eigenvectors"] = vectors
        return out


def combine(parts: list[np.ndarray]) -> np.ndarray:
    """Add partials one after another in the order given (block order): a fixed order of
    float64 additions, so the same partials always give the same bits."""
    total = np.array(parts[0], dtype=np.float64, copy=True)
    for part in parts[1:]:
        total += part
    return total


def spectral_gap(values: np.ndarray) -> tuple[int, float]:
    """(k, ratio): the largest ratio of consecutive eigenvalues lambda_k / lambda_{k+1} (1-based
    k), over the positive ones; (0, nan) when there are fewer than two."""
    positive = values[values > 0]
    if positive.size < 2:
        return 0, float("nan")
    ratios = positive[:-1] / positive[1:]
    k = int(np.argmax(ratios))
    return k + 1, float(ratios[k])
