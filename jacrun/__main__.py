"""``python -m jacrun`` runs the CLI."""

from jacrun.cli import main

if __name__ == "__main__":  # Dask's worker processes re-import this module: never run twice
    main()
