"""``jacrun plot``: one PNG that fits what a store holds (matplotlib, ``pip install 'jacrun[plot]'``).

- a Gram: its eigenvalues on a log scale with the largest gap marked, and its first eigenvectors;
- norms: their histogram;
- per-sample products: their mean and spread (one standard deviation) per input coordinate
  (per output for jvp, per nonzero for a sparse Jacobian).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jacrun.errors import ConfigError

EIGENVECTORS = 3
"""Eigenvectors drawn beside the eigenvalues."""


def default_output(store: str | Path) -> Path:
    """``results/job.zarr`` -> ``results/job.png``; ``s3://bucket/job.zarr`` -> ``job.png`` here."""
    from jacrun.location import is_url

    path = Path(str(store).rstrip("/").rsplit("/", 1)[-1]) if is_url(str(store)) else Path(store)
    return path.with_suffix(".png") if path.suffix == ".zarr" else path.with_name(path.name + ".png")


def plot_store(store: str | Path, output: str | Path | None = None) -> Path:
    """Draw the store's panels (a path or a URL whose options are registered) into a PNG and
    return its path. ConfigError when matplotlib is missing or the store holds nothing to draw
    (nothing is written then)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plot needs matplotlib: pip install 'jacrun[plot]'") from None
    from jacrun.store import load

    ds = load(store)
    attrs = ds.attrs["jacrun"]
    panels = []
    if "gram_eigenvalues" in ds:
        panels += [_eigenvalues, _eigenvectors]
    if "norms" in ds:
        panels.append(_norms)
    result = attrs.get("mode")
    if result in ds:
        panels.append(_products)
    if not panels:
        raise ConfigError(f"{store}: holds nothing to plot (no products, Gram or norms)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for panel, ax in zip(panels, axes[0], strict=True):
        panel(ds, ax)
    fig.suptitle(f"{attrs.get('name')}: {result} of {attrs.get('function', {}).get('kind')}")
    fig.tight_layout()
    path = Path(output) if output is not None else default_output(store)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _eigenvalues(ds, ax) -> None:
    from jacrun.reduce import spectral_gap

    values = ds.gram_eigenvalues.values
    index = np.arange(1, values.size + 1)
    positive = values > 0
    ax.semilogy(index[positive], values[positive], "o-", ms=3)
    k, ratio = spectral_gap(values)
    if k:
        ax.axvline(k + 0.5, color="tab:red", ls="--", label=f"gap after {k}: x{ratio:.3g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Gram eigenvalues")


def _eigenvectors(ds, ax) -> None:
    vectors = ds.gram_eigenvectors.values
    for k in range(min(EIGENVECTORS, vectors.shape[1])):
        ax.plot(vectors[:, k], label=f"v{k + 1}")
    ax.set_xlabel(ds.gram_eigenvectors.dims[0])
    ax.set_title("leading eigenvectors")
    ax.legend(fontsize=8)


def _norms(ds, ax) -> None:
    values = ds.norms.values.ravel()
    ax.hist(values[np.isfinite(values)], bins=50)
    jacobians = ds.attrs["jacrun"]["mode"] == "jacobian"
    ax.set_xlabel("Frobenius norm of J" if jacobians else "norm of a product")
    ax.set_ylabel("count")
    ax.set_title("per-sample norms")


def _products(ds, ax) -> None:
    result = ds[ds.attrs["jacrun"]["mode"]]
    last = result.dims[-1]
    others = [dim for dim in result.dims if dim != last]
    mean = result.mean(dim=others).values
    spread = result.std(dim=others).values
    coordinate = np.arange(mean.size)
    ax.plot(coordinate, mean, lw=1)
    ax.fill_between(coordinate, mean - spread, mean + spread, alpha=0.3)
    ax.set_xlabel(last)
    ax.set_title("mean +- std over samples")
