"""Free space for a local store: a job whose results cannot fit is refused before anything is
written, instead of failing when the disk fills part way.

The size a job still writes is the plan's raw result size for its unfinished blocks (plus the
reductions' partial sums and a file-system block per chunk file). Compressed stores are sized by
the fraction their codec keeps, measured by encoding what the first block writes for a few
samples, and only when the raw size would not fit: a job that fits uncompressed costs nothing
to check. Object stores report no free space: nothing is checked there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jacrun import location, store
from jacrun.errors import ConfigError
from jacrun.plan import fmt_bytes
from jacrun.prepare import PreparedJob, sample_results

MARGIN = 1.1
"""Headroom over the projected size: file-system metadata, codec variation across samples."""
FILE_BLOCK = 4096
"""Bytes a file system gives each chunk file at least (its block size)."""
SAMPLE_ROWS = 64
"""Samples whose encoded results give a compressed store's encoded fraction."""


def check_free_space(job: PreparedJob, replacing: bool = False) -> None:
    """Refuse (ConfigError naming output.store) a job whose unfinished blocks need more space
    than the local store's file system has free. ``replacing``: the existing store is deleted
    first (``--overwrite``), so its blocks count as unfinished and its files as free."""
    path = job.config.output.store
    folder = location.local_path(path)
    if folder is None:
        return
    existing = _nearest_existing(folder)
    free = shutil.disk_usage(existing).free
    plan = job.plan
    unfinished = 1.0
    if store.store_state(path) == "jacrun":
        if replacing:
            free += _size_of(folder)
        else:
            unfinished = 1.0 - float(store.read_markers(path).mean())
    files = plan.n_blocks * (2 + (1 if plan.save_outputs else 0) + len(plan.reductions))
    raw = plan.output_bytes * unfinished + plan.partial_bytes + files * FILE_BLOCK
    if raw * MARGIN <= free:
        return
    needed, how = raw, "uncompressed"
    compression = job.config.output.compression
    if compression != "none":
        fraction = min(
            1.0,
            store.encoded_fraction(sample_results(job, SAMPLE_ROWS), compression, job.config.output_dtype),
        )
        needed = raw * fraction
        how = f"{compression} keeps {fraction:.0%} of {fmt_bytes(raw)} on the first samples"
        if needed * MARGIN <= free:
            return
    left = "" if unfinished == 1.0 else f" ({unfinished:.0%} of its blocks are unfinished)"
    raise ConfigError(
        f"output.store: the job needs about {fmt_bytes(needed * MARGIN)} ({how}, with a "
        f"{MARGIN - 1:.0%} margin){left}, but {existing} has {fmt_bytes(free)} free; free space "
        "or choose another output.store"
    )


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _size_of(folder: Path) -> int:
    """Bytes of the files under ``folder`` (what deleting it frees, to a block per file)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total
