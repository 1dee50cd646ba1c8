"""jacrun's benchmark: kernels, end-to-end jobs, worker memory and the autodiff adapters in one report.

Run it as ``python scripts/bench.py [flags]`` (or ``python -m jacrun_bench [flags]`` with
``scripts/`` on ``PYTHONPATH``); ``--help`` lists the flags. docs/performance.md says how to read
the report.

Layout:

- ``cli.py``: the command line and :func:`~jacrun_bench.cli.run`, which runs the sections in
  order and assembles the report;
- ``sections.py``: :data:`~jacrun_bench.sections.SECTIONS`, the registry, and the
  :class:`~jacrun_bench.sections.Section` protocol a section module follows;
- ``common.py``: shapes, the timing rounds, the run's :class:`~jacrun_bench.common.Context`
  and :class:`~jacrun_bench.common.Target`;
- ``frameworks.py``: the same work written in torch, jax and autograd;
- one module per section: ``kernels.py`` (in process, against the frameworks), ``e2e.py``
  (``jacrun.submit`` on a local cluster against the in-process kernel, one block's steps, the
  codecs), ``memory.py`` (the workers' peak memory in those jobs against the plan),
  ``adapters.py`` (``scripts/bench_adapters.py``'s table);
- ``report.py``: the header (machine, BLAS, worker settings) and the targets table.

Adding a section (say ``sparse``): write ``scripts/jacrun_bench/sparse.py`` with ``NAME =
"sparse"``, ``TITLE``, ``HELP`` (the help of its ``--skip-sparse`` flag), ``measure(ctx) ->
result``, ``render(result, ctx) -> str`` (markdown) and ``targets(result) -> list[Target]``,
and add ``"sparse"`` to :data:`~jacrun_bench.sections.SECTIONS`. The flag, the heading, the
skip message and its rows in the targets table follow from that. ``ctx`` (a
:class:`~jacrun_bench.common.Context`) carries ``quick`` (choose the section's own sizes by it,
or add fields to :class:`~jacrun_bench.common.Shapes`), ``reps``-adjusted ``shapes``, the
frameworks, ``log``, and ``results``: what each earlier section returned (``memory`` reads
``results["e2e"]``; None for a skipped one). A section measures through
jacrun's own functions (``jacrun.submit``, ``jacrun.block.run_block``, a ``Function``'s
kernels), never a hand-written copy of a block.

This module imports no NumPy: :func:`numpy_without_huge_pages` must run before NumPy loads.
"""

from __future__ import annotations

import os

USER_HUGEPAGE: str | None = os.environ.get("NUMPY_MADVISE_HUGEPAGE")
"""``NUMPY_MADVISE_HUGEPAGE`` as the user set it (None: unset, NumPy's default)."""


def numpy_without_huge_pages() -> None:
    """Import NumPy with its huge pages off in this process, and leave no variable behind.

    NumPy asks the kernel for huge pages on arrays of 4 MiB and more. Once torch and jax have
    fragmented this process's memory, every fresh large result (a B=256 Jacobian is 268 MB) then
    stalls in the kernel's page compaction: jacrun's Jacobian row measured 1410 ms instead of
    1206 ms. NumPy's documented switch, read once at import, turns that off for the NumPy
    contenders (jacrun, the GEMM peak, autograd); torch and jax use their own allocators.
    The cluster's workers (which run no framework) keep NumPy's default: the variable is set only
    while NumPy is imported, and only if the user did not set it (then theirs holds everywhere).
    Call it from the entry point only: spawned worker processes re-import the entry module.
    """
    if USER_HUGEPAGE is not None:
        import numpy  # noqa: F401

        return
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
    try:
        import numpy  # noqa: F401
    finally:
        os.environ.pop("NUMPY_MADVISE_HUGEPAGE", None)
