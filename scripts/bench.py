"""Benchmark jacrun's kernels and its job runner: ``python scripts/bench.py [flags]``.

The entry point of the benchmark package ``scripts/jacrun_bench`` (its docstring describes the
sections and how to add one; docs/performance.md how to run it and read the report).
``--help`` lists the flags.
"""

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jacrun_bench import numpy_without_huge_pages  # noqa: E402

if __name__ == "__main__":
    numpy_without_huge_pages()
    from jacrun_bench.cli import main

    with contextlib.suppress(KeyboardInterrupt):
        main()
