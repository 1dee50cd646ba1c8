"""``autodiff: torch``: ``torch.func.vjp`` / ``jvp`` of a function or ``nn.Module``, under ``vmap``.

A per-sample f becomes the batched map ``vmap(f)``; a ``batched: true`` f is used as it is.
Then, on a block x (B, n) with K vectors:

- vjp: one ``vjp`` of the batched map (one forward pass), its pullback vmapped over the K
  cotangents: ``vmap(pullback, in_dims=1, out_dims=1)(v)``;
- jvp: ``jvp`` vmapped over the K tangents; the primal does not depend on them, so the
  forward pass runs once (``out_dims=(None, 1)``). torch's forward-mode AD is not thread-safe,
  so JVPs take a per-process lock.

Arrays cross as zero-copy views (``torch.from_numpy``, ``Tensor.numpy``). A module is moved
to the config's dtype, put in eval mode (dropout off, batch norm on its running statistics)
and its parameters stop requiring gradients. ``torch.set_num_threads`` follows ``threads``
(default: the process's BLAS thread count, which jacrun sets on its workers).

A sparse Jacobian's block runs all C seeds in one ``torch.func`` call per cache-sized range
of rows and gathers the nonzeros with ``index_select`` into the block's buffer
(:meth:`TorchFunction._fuse`), on torch's own threads.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from jacrun.functions import adapters
from jacrun.functions.adapters import AutodiffFunction, Fused
from jacrun.functions.targets import TargetError

if TYPE_CHECKING:
    from jacrun.sparsity import SparseJacobian

TARGET_CLASSES: tuple[type, ...] = (nn.Module,)
"""Classes accepted as targets (instantiated with params) and as factory return annotations."""

DTYPES = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}

_FORWARD_AD = threading.Lock()
"""torch's forward-mode AD keeps its dual levels per process, not per thread: two threads in
``torch.func.jvp`` at once fail ("no level exists"), so JVPs run one at a time per process."""

# jacrun passes read-only arrays (inputs, broadcast vectors) and never lets torch write into them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def setup(*, dtype: np.dtype, threads: int | None) -> None:
    """Intra-op threads before anything is built: ``threads``, else the BLAS thread count."""
    threads = threads or adapters.blas_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def factory_dtype(dtype: np.dtype) -> torch.dtype:
    """What a factory's or module's ``dtype`` parameter receives: the torch dtype."""
    return DTYPES[np.dtype(dtype)]


def prepare(fn: Callable[..., Any], *, dtype: np.dtype, weights: Path | None) -> Callable[..., Any]:
    """Load ``weights`` into a module, move it to ``dtype``, eval mode, no parameter gradients."""
    if not isinstance(fn, nn.Module):
        if weights is not None:
            raise TargetError(
                "weights: needs an nn.Module to load a state dict into, or a target with a "
                "`weights` parameter"
            )
        return fn
    if weights is not None:
        load_state(fn, weights)
    fn = fn.to(DTYPES[np.dtype(dtype)]).eval()
    fn.requires_grad_(False)
    return fn


def load_state(module: nn.Module, path: Path) -> None:
    """A state dict from ``torch.save`` (loaded with weights_only) or an .npz of the same keys."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            state: Any = {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TargetError(f"weights {path}: cannot read a state dict: {exc}") from exc
    if not isinstance(state, Mapping):
        raise TargetError(f"weights {path} holds {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TargetError(f"weights {path} do not fit {type(module).__name__}: {exc}") from None


def default_width(fn: Any) -> int | None:
    """A module's largest parameter dimension (a dense layer's width), for the memory model."""
    if not isinstance(fn, nn.Module):
        return None
    return max((max(p.shape) for p in fn.parameters() if p.ndim), default=None)


class TorchFunction(AutodiffFunction):
    """Kernels from ``torch.func``; the batched map is ``fn`` or ``vmap(fn)``."""

    backend = "torch"

    def _compile(self) -> None:
        fn = self._vector_fn()
        self._batched = fn if self.batched else vmap(fn)

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return _numpy(self._batched(_tensor(x)))

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y, pullback = vjp(self._batched, _tensor(x))
        xbar = vmap(lambda vk: pullback(vk)[0], in_dims=1, out_dims=1)(_tensor(v))
        return _numpy(y), _numpy(xbar)

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xt, f = _tensor(x), self._batched
        with _FORWARD_AD:
            y, ydot = vmap(lambda tk: jvp(f, (xt,), (tk,)), in_dims=1, out_dims=(None, 1))(_tensor(t))
        return _numpy(y), _numpy(ydot)

    fuses = True

    def _fuse(self, sparse: SparseJacobian) -> Fused:
        """The products for all C seeds in one ``torch.func`` call per range of rows (the
        kernels of :meth:`vjp_batch` / :meth:`jvp_batch` on the seeds broadcast over the rows,
        so the same numbers), each gathered by ``index_select`` into the block's nonzeros.

        Ranges hold about ``CHUNK_BYTES`` of compressed products (:meth:`fused_rows`): torch
        runs each step of the pullback on whole tensors, so a whole block's products at L = 128
        would stream every step through memory (the 9-point residual's VJPs ran 4x slower in
        one call than one sample at a time); in the cache they run on torch's own threads.
        """
        f, forward = self._batched, sparse.direction == "fwd"
        seeds = torch.from_numpy(sparse.seeds(0, sparse.n_colours, self.dtype))
        index = torch.from_numpy(sparse.index_map)
        span = self.fused_rows(sparse, 1 << 62)

        def products(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            vectors = seeds.expand(xt.shape[0], *seeds.shape)
            if forward:
                with _FORWARD_AD:
                    return vmap(lambda tk: jvp(f, (xt,), (tk,)), in_dims=1, out_dims=(None, 1))(vectors)
            y, pullback = vjp(f, xt)
            return y, vmap(lambda vk: pullback(vk)[0], in_dims=1, out_dims=1)(vectors)

        def run(x: np.ndarray, outputs: bool, out: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
            xt = _tensor(x)
            rows = xt.shape[0]
            if out is None:
                out = np.empty((rows, sparse.nnz), self.dtype)
            values = torch.from_numpy(out)
            y = torch.empty((rows, self.n_out), dtype=values.dtype) if outputs else None
            for start in range(0, rows, span):
                stop = min(start + span, rows)
                part, compressed = products(xt[start:stop])
                torch.index_select(compressed.reshape(stop - start, -1), 1, index, out=values[start:stop])
                if y is not None:
                    y[start:stop] = part
            return (None if y is None else y.numpy()), out

        return run

    def fused_rows(self, sparse: SparseJacobian, rows: int) -> int:
        """Rows per ``torch.func`` call: about ``CHUNK_BYTES`` of compressed products."""
        return min(rows, sparse.kernel_rows(self.dtype.itemsize))


Adapter = TorchFunction


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor (stride-0 broadcast views included); copies only negative strides."""
    if any(stride < 0 for stride in a.strides):
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy())
