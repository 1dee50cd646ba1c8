"""The Function protocol: a batched map R^n -> R^m with hand-written VJP and JVP kernels.

Implementers subclass :class:`Function` and write three batched kernels that always see
three-dimensional vector batches:

- ``forward_batch(x)``: x (B, n) -> y (B, m)
- ``vjp_batch(x, v)``: v (B, K, m) -> (y (B, m), xbar (B, K, n)), xbar[b, k] = v[b, k] @ J(x[b])
- ``jvp_batch(x, t)``: t (B, K, n) -> (y (B, m), ydot (B, K, m)), ydot[b, k] = J(x[b]) @ t[b, k]

The vector batch may be a read-only broadcast view (shared vectors), so kernels must not write
into it. One forward pass serves all K vectors. The public ``forward``, ``vjp``, ``jvp`` and
``jacobian`` methods validate shapes, cast to the compute dtype and accept two-dimensional
vectors (K = 1, squeezed), as ``y.backward(v)`` does in PyTorch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import scipy.sparse

    from jacrun.sparsity import SparseJacobian

Mode = Literal["vjp", "jvp", "jacobian"]
Strategy = Literal["rev", "fwd", "auto"]


class FunctionSpec(BaseModel):
    """Config of a function: ``kind`` picks the implementation, the rest are its parameters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    kind: str
    dtype: Literal["float32", "float64"] = Field("float64", description="compute dtype")


class Function(ABC):
    """A differentiable map applied independently to every row of a batch."""

    kind: ClassVar[str] = ""
    """Registry name, the ``kind`` of the config."""
    description: ClassVar[str] = ""
    """One line for ``jacrun functions``."""
    spec_model: ClassVar[type[FunctionSpec]] = FunctionSpec
    """Pydantic model of the config section; its field descriptions document the parameters."""

    n_in: int
    n_out: int
    dtype: np.dtype

    reverse: ClassVar[bool] = True
    """Whether ``vjp_batch`` is a reverse mode (its cost independent of n). Finite differences
    have none: their VJPs go through the Jacobian, so their Jacobians are computed column-wise
    (``strategy: fwd``, column colourings)."""

    @classmethod
    def from_spec(cls, spec: FunctionSpec) -> Function:
        """Build from a validated spec. Built-ins override this."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

    # ---- kernels: implementers write these -------------------------------------------------

    @abstractmethod
    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        """x (B, n) -> y (B, m)."""

    @abstractmethod
    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (B, n), v (B, K, m) -> (y (B, m), xbar (B, K, n))."""

    @abstractmethod
    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (B, n), t (B, K, n) -> (y (B, m), ydot (B, K, m))."""

    # ---- structure -------------------------------------------------------------------------

    def sparsity(self) -> scipy.sparse.sparray | Literal["dense"] | None:
        """The structural nonzeros of J(x), a scipy.sparse matrix (m, n) valid for every x;
        ``"dense"`` when every entry may be nonzero (no m x n pattern is built); or None when
        the function does not declare one (``sparsity: auto`` then stays dense).

        An entry left out must be zero for every x: a sparse Jacobian job computes only the
        declared entries (``jacrun check`` on the job catches a missing one).
        """
        return None

    def sparse_nonzeros(
        self, x: np.ndarray, sparse: SparseJacobian, out: np.ndarray, outputs: bool = True
    ) -> np.ndarray | None:
        """y (B, m) of x (B, n), and the nonzeros of J(x) in ``sparse``'s CSR order written into
        ``out`` (B, nnz): the gather of the compressed products J(x) S (or S^T J(x)).

        The general path, for NumPy functions: called per range of samples on the kernel
        threads (see :meth:`fused_nonzeros` for a whole-block path). The default runs
        ``jvp_batch`` (``vjp_batch``) on the seeds, then gathers. A function may override it
        when it can form the gather without the products, as ``bratu`` does;
        its :meth:`sparse_cache_bytes` then counts what it keeps for that. With ``outputs``
        false it may skip y and return None.
        """
        return sparse.gather_products(self, x, out)

    def sparse_cache_bytes(self, sparse: SparseJacobian) -> int:
        """Memory kept between calls of :meth:`sparse_nonzeros` for ``sparse``."""
        return 0

    def fused_nonzeros(
        self, x: np.ndarray, sparse: SparseJacobian, out: np.ndarray | None = None, outputs: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray] | None:
        """(y (B, m) or None, nonzeros (B, nnz)) of a whole block, or None (the default) when
        the function has no such fused path.

        A framework computes the products for all colours and the gather together, in compiled
        computations that thread themselves (the autodiff adapters do: ``jax.jit``,
        ``torch.func``); :meth:`SparseJacobian.evaluate` then calls this once per block instead
        of :meth:`sparse_nonzeros` on ranges on the kernel threads. The nonzeros go into ``out``
        when given, else into a buffer of the function's (the framework's own result). Its
        memory is :meth:`fused_work_bytes`. With ``outputs`` false, y may be None.
        """
        return None

    def fused_work_bytes(self, sparse: SparseJacobian, rows: int) -> int | None:
        """Peak temporary memory of :meth:`fused_nonzeros` on ``rows`` samples, the nonzeros
        and y excluded (the planner counts those); None when there is no fused path."""
        return None

    # ---- domain, notes and attributes ---------------------------------------------------------

    def check_inputs(self, x: np.ndarray) -> None:
        """Raise ValueError (naming the config key) when rows of ``x`` lie outside the domain the
        function was configured with (finite differences' ``fd.bounds``); nothing by default."""
        return

    def plan_notes(self, mode: Mode, sparse: SparseJacobian | None) -> tuple[str, ...]:
        """Warnings about what this function's kernels cost in ``mode`` (``sparse``: the job's
        colouring), printed by ``jacrun plan`` and kept in the plan; none by default."""
        return ()

    def attributes(self) -> dict:
        """JSON-able facts about how the kernels compute, kept in the store's ``function``
        attribute; a ``summary`` string is shown by ``jacrun plan`` and ``jacrun show``."""
        return {}

    # ---- cost model for the planner --------------------------------------------------------

    def work_bytes(self, batch: int, k: int, mode: Mode) -> int:
        """Peak temporary memory of one kernel call on ``batch`` rows and ``k`` vectors.

        Excludes the inputs and the returned arrays (the planner counts those). The default
        assumes a few arrays of the widest intermediate; built-ins give exact models.
        """
        width = max(self.n_in, self.n_out)
        return 4 * batch * (k + 1) * width * self.dtype.itemsize

    def flops(self, batch: int, k: int, mode: Mode) -> float:
        """Floating-point operations of one kernel call; NaN when unknown."""
        return float("nan")

    # ---- public API ------------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Evaluate f on a batch: x (B, n) -> y (B, m)."""
        return self.forward_batch(self._rows(x))

    def vjp(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vector-Jacobian products: v (B, K, m) -> (y, xbar (B, K, n)); v (B, m) -> (y, xbar (B, n))."""
        x = self._rows(x)
        v3, squeeze = self._vectors(v, x.shape[0], self.n_out, "v")
        y, xbar = self.vjp_batch(x, v3)
        return y, (xbar[:, 0] if squeeze else xbar)

    def jvp(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Jacobian-vector products: t (B, K, n) -> (y, ydot (B, K, m)); t (B, n) -> (y, ydot (B, m))."""
        x = self._rows(x)
        t3, squeeze = self._vectors(t, x.shape[0], self.n_in, "t")
        y, ydot = self.jvp_batch(x, t3)
        return y, (ydot[:, 0] if squeeze else ydot)

    def jacobian(self, x: np.ndarray, strategy: Strategy = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Per-sample Jacobians: x (B, n) -> (y (B, m), J (B, m, n))."""
        x = self._rows(x)
        strategy = resolve_strategy(strategy, self.n_in, self.n_out)
        if strategy == "rev":
            basis = basis_vectors(self.n_out, 0, self.n_out, self.dtype)
            return self.vjp_batch(x, np.broadcast_to(basis, (x.shape[0], *basis.shape)))
        basis = basis_vectors(self.n_in, 0, self.n_in, self.dtype)
        y, ydot = self.jvp_batch(x, np.broadcast_to(basis, (x.shape[0], *basis.shape)))
        return y, np.ascontiguousarray(ydot.transpose(0, 2, 1))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_in={self.n_in}, n_out={self.n_out}, dtype={self.dtype})"

    # ---- helpers ---------------------------------------------------------------------------

    def _rows(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"x must have shape (batch, {self.n_in}), got {x.shape}")
        return x

    def _vectors(self, v: np.ndarray, batch: int, width: int, name: str) -> tuple[np.ndarray, bool]:
        v = np.asarray(v, dtype=self.dtype)
        if v.ndim == 2 and v.shape == (batch, width):
            return v[:, None, :], True
        if v.ndim == 3 and v.shape[0] == batch and v.shape[2] == width:
            return v, False
        raise ValueError(f"{name} must have shape ({batch}, K, {width}) or ({batch}, {width}), got {v.shape}")


def resolve_strategy(strategy: Strategy, n_in: int, n_out: int) -> Literal["rev", "fwd"]:
    """``auto`` picks reverse mode when there are fewer outputs than inputs (m passes < n passes)."""
    if strategy == "auto":
        return "rev" if n_out <= n_in else "fwd"
    return strategy


def basis_vectors(dim: int, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
    """Rows ``start:stop`` of the identity of size ``dim``: unit vectors e_start .. e_{stop-1}."""
    out = np.zeros((stop - start, dim), dtype=dtype)
    out[np.arange(stop - start), np.arange(start, stop)] = 1
    return out


def block_kernel(
    function: Function, reverse: bool, sparse: SparseJacobian | None, outputs: bool
) -> Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray | None, np.ndarray]]:
    """(x, vectors) -> (y, a block's results) as a block computes them: the function's VJP or
    JVP kernel, or a sparse Jacobian's nonzeros (from its own seeds: ``vectors`` unused, and y
    None unless ``outputs``)."""
    if sparse is None:
        return function.vjp_batch if reverse else function.jvp_batch

    def nonzeros(x: np.ndarray, _: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        return sparse.evaluate(function, x, outputs=outputs)

    return nonzeros
