"""``autodiff: jax``: ``jax.vjp`` / ``jvp`` under ``vmap``, jit-compiled.

On a block x (B, n) with K vectors, for a per-sample f (``vmap`` over the samples of):

- vjp: one ``jax.vjp(f, x_b)`` (one forward pass), its pullback vmapped over the K cotangents;
- jvp: ``jax.jvp`` vmapped over the K tangents with the primal unbatched
  (``out_axes=(None, 0)``), so the forward pass runs once;

and for a ``batched: true`` f the same on the whole block, the vector axis vmapped.

Each kernel is one ``jax.jit`` function, built once per Function (once per worker, since
workers cache the built Function) and compiled by JAX once per block shape. Vectors shared by
every sample (a stride-0 broadcast, as for ``mode: jacobian``) travel as the (K, d) array
and are broadcast inside the compiled function. float64 enables ``jax_enable_x64`` (a
process-wide JAX setting) before the target is built.

A sparse Jacobian's block is one compiled computation (:meth:`JaxFunction._fuse`): the shared
kernel on all C seeds and the gather of the nonzeros, on XLA's own threads, returning the
(B, nnz) nonzeros as they leave XLA (no copy); a block with more than
:data:`WHOLE_BLOCK_BYTES` of products runs it on cache-sized ranges of rows instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jacrun.functions.adapters import (
    AutodiffFunction,
    Fused,
    no_width_hint,
    numpy_factory_dtype,
    weights_unsupported,
)

if TYPE_CHECKING:
    from jacrun.sparsity import SparseJacobian

TARGET_CLASSES: tuple[type, ...] = ()

# the backend hooks the adapter package looks up (shared with the other NumPy-array backend)
factory_dtype = numpy_factory_dtype
prepare = weights_unsupported
default_width = no_width_hint


WHOLE_BLOCK_BYTES = 64 << 20
"""A block whose compressed products take at most this many bytes runs in one call, and XLA's
nonzeros are the block's, not copied. A larger block, or one whose nonzeros go into a given
array anyway, runs in ranges of about ``CHUNK_BYTES`` of products (:mod:`jacrun.sparsity`),
each range's nonzeros copied from the cache into the block's.

XLA allocates its buffers afresh on every call, and a large result read back for a copy comes
from memory, not the cache. Measured in process on 32 samples of the stencils of
docs/performance.md, without a given buffer: one call ran 1.9-2.2x as fast as ranges with 37
MB of products (the 9-point residual at L = 128); ranges ran 1.1-1.3x as fast with 84-150 MB
(L = 256)."""


def setup(*, dtype: np.dtype, threads: int | None) -> None:
    """float64 needs x64 on before any array of the target is created."""
    if np.dtype(dtype) == np.float64 and not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)


class JaxFunction(AutodiffFunction):
    """Kernels from ``jax.vjp`` / ``jax.jvp``; the batched map is ``fn`` or ``vmap(fn)``."""

    backend = "jax"

    fuses = True

    def _compile(self) -> None:
        fn = self._vector_fn()
        if self.batched:
            forward, vjp_rows, vjp_shared, jvp_rows, jvp_shared = _batched_kernels(fn)
        else:
            forward, vjp_rows, vjp_shared, jvp_rows, jvp_shared = _per_sample_kernels(fn)
        self._forward = jax.jit(forward)
        self._vjp = {False: jax.jit(vjp_rows), True: jax.jit(vjp_shared)}
        self._jvp = {False: jax.jit(jvp_rows), True: jax.jit(jvp_shared)}
        self._shared_kernels = {"fwd": jvp_shared, "rev": vjp_shared}

    def _fuse(self, sparse: SparseJacobian) -> Fused:
        """One ``jax.jit`` function: the shared-vector kernel of ``sparse``'s direction on the
        C seeds (the products (rows, C, w), as ``jvp_batch`` / ``vjp_batch`` compute them),
        then the gather by the index map, inside the same computation, compiled per shape.
        The seeds and the index map are constants of the computation: XLA then simplifies the
        one-hot tangents (2.5x faster than passing them as arguments, the 9-point residual at
        L = 64); int32 indices while the compressed products have fewer than 2^31 entries.

        It runs on the whole block, or on ranges of :meth:`fused_rows` rows one after the other
        (on XLA's threads either way); a block that is one call gets XLA's own buffer back (no
        copy), otherwise each range's nonzeros are copied into the block's (or into ``out``).
        """
        products = self._shared_kernels[sparse.direction]
        seeds = jnp.asarray(sparse.seeds(0, sparse.n_colours, self.dtype))
        flat = sparse.n_colours * sparse.product_width
        index = jnp.asarray(sparse.index_map.astype(np.int32 if flat < 2**31 else np.int64))

        def nonzeros(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            y, compressed = products(x, seeds)
            flat = compressed.reshape(compressed.shape[0], -1)
            return y, flat.at[:, index].get(mode="promise_in_bounds", unique_indices=True)

        compiled = {True: jax.jit(nonzeros), False: jax.jit(lambda x: (None, nonzeros(x)[1]))}

        def run(x: np.ndarray, outputs: bool, out: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
            rows = x.shape[0]
            span = self.fused_rows(sparse, rows, copied=out is not None)
            if span >= rows and out is None:
                y, values = compiled[outputs](x)
                return (np.asarray(y) if outputs else None), np.asarray(values)
            values = np.empty((rows, sparse.nnz), self.dtype) if out is None else out
            y = np.empty((rows, self.n_out), self.dtype) if outputs else None
            for start in range(0, rows, span):
                stop = min(start + span, rows)
                part, chunk = compiled[outputs](x[start:stop])
                np.copyto(values[start:stop], np.asarray(chunk))
                if y is not None:
                    y[start:stop] = np.asarray(part)
            return y, values

        return run

    def fused_memory_rows(self, sparse: SparseJacobian, rows: int) -> int:
        """The whole block, even where it runs in ranges: the ranges' smaller buffers leave room
        for XLA's compilation of the kernel on a worker's first block, which the per-block
        model has no term for (measured: 40-60 MiB for the 9-point residual at L = 128)."""
        return rows

    def fused_rows(self, sparse: SparseJacobian, rows: int, copied: bool = False) -> int:
        """Rows per call: the whole block while its compressed products are within
        :data:`WHOLE_BLOCK_BYTES` and its nonzeros are not ``copied`` into a given array; else
        about ``CHUNK_BYTES`` of products, as on the general path."""
        products = rows * sparse.n_colours * sparse.product_width * self.dtype.itemsize
        if products <= WHOLE_BLOCK_BYTES and not copied:
            return rows
        return min(rows, sparse.kernel_rows(self.dtype.itemsize))

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._forward(x))

    def detect_sparsity(self):
        """J's global pattern (m, n) from asdex's analysis of the traced function (valid for
        every x; ``pip install 'jacrun[detect]'``). A batched f is traced on one row."""
        import asdex
        import scipy.sparse as sp

        fn = self._vector_fn()
        if self.batched:
            batched = fn
            fn = lambda xi: batched(xi[None])[0]  # noqa: E731
        pattern = asdex.jacobian_sparsity(fn, jnp.zeros(self.n_in, self.dtype))
        data = np.ones(len(pattern.rows), dtype=bool)
        return sp.csr_array((data, (np.asarray(pattern.rows), np.asarray(pattern.cols))), shape=pattern.shape)

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shared = _shared(v)
        y, xbar = self._vjp[shared](x, v[0] if shared else v)
        return np.asarray(y), np.asarray(xbar)

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shared = _shared(t)
        y, ydot = self._jvp[shared](x, t[0] if shared else t)
        return np.asarray(y), np.asarray(ydot)


Adapter = JaxFunction

Kernel = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _per_sample_kernels(fn: Callable[..., Any]) -> tuple[Callable[..., Any], Kernel, Kernel, Kernel, Kernel]:
    """f of one sample: vmap over samples of (one vjp, pullback vmapped over the K vectors).

    Rows vectors are (B, K, d), shared vectors (K, d) (``in_axes=None``, nothing broadcast).
    """

    def vjp_one(xi: jax.Array, vi: jax.Array) -> tuple[jax.Array, jax.Array]:
        y, pullback = jax.vjp(fn, xi)
        return y, jax.vmap(lambda vk: pullback(vk)[0])(vi)

    def jvp_one(xi: jax.Array, ti: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.vmap(lambda tk: jax.jvp(fn, (xi,), (tk,)), out_axes=(None, 0))(ti)

    return (
        jax.vmap(fn),
        jax.vmap(vjp_one),
        jax.vmap(vjp_one, in_axes=(0, None)),
        jax.vmap(jvp_one),
        jax.vmap(jvp_one, in_axes=(0, None)),
    )


def _batched_kernels(fn: Callable[..., Any]) -> tuple[Callable[..., Any], Kernel, Kernel, Kernel, Kernel]:
    """f of a batch: one vjp of f, its pullback vmapped over the vector axis; jvp likewise."""

    def vjp_rows(x: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:  # v (B, K, m)
        y, pullback = jax.vjp(fn, x)
        return y, jax.vmap(lambda vk: pullback(vk)[0], in_axes=1, out_axes=1)(v)

    def vjp_shared(x: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:  # v (K, m)
        y, pullback = jax.vjp(fn, x)
        return y, jax.vmap(lambda vk: pullback(jnp.broadcast_to(vk, y.shape))[0], out_axes=1)(v)

    def jvp_rows(x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:  # t (B, K, n)
        return jax.vmap(lambda tk: jax.jvp(fn, (x,), (tk,)), in_axes=1, out_axes=(None, 1))(t)

    def jvp_shared(x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:  # t (K, n)
        def one(tk: jax.Array) -> tuple[jax.Array, jax.Array]:
            return jax.jvp(fn, (x,), (jnp.broadcast_to(tk, x.shape),))

        return jax.vmap(one, out_axes=(None, 1))(t)

    return fn, vjp_rows, vjp_shared, jvp_rows, jvp_shared


def _shared(v: np.ndarray) -> bool:
    """The same vectors for every row: a broadcast view with stride 0 along the samples."""
    return v.shape[0] > 1 and v.strides[0] == 0
