"""``python -m jacrun_bench [flags]`` (with ``scripts/`` on ``PYTHONPATH``): the benchmark."""

import contextlib

from jacrun_bench import numpy_without_huge_pages

if __name__ == "__main__":
    numpy_without_huge_pages()
    from jacrun_bench.cli import main

    with contextlib.suppress(KeyboardInterrupt):
        main()
