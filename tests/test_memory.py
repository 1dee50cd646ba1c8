"""keep_freed_memory: a worker reuses freed block memory instead of faulting fresh pages in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from dask.distributed import Client

import jacrun
from jacrun.memory import OVERRIDE
from tests.helpers import job_config

FAULTS = """
import json, resource, sys
import numpy as np
from jacrun.memory import keep_freed_memory

def faults():  # minor page faults of allocating and filling a 3 MiB array, 20 times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        np.ones(3 << 17)  # 3 MiB: under NumPy's 4 MiB huge-page threshold, so 4 KiB pages
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
plain = faults()
applied = keep_freed_memory()
print(json.dumps({"plain": plain, "kept": faults(), "applied": applied}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_stops_page_faults_under_dasks_malloc_setting() -> None:
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which makes every large array a fresh mmap;
    after keep_freed_memory the same allocations reuse the heap."""
    # without malloc's huge pages (a GLIBC_TUNABLES of the caller's), which would cut the faults counted
    env = {name: value for name, value in os.environ.items() if name not in ("GLIBC_TUNABLES", OVERRIDE)}
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout)
    assert counts["applied"]
    assert counts["plain"] > 20 * 700  # 768 pages of 4 KiB per array
    assert counts["kept"] < counts["plain"] / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_glibcs_own_mmap_threshold_turns_the_setting_off() -> None:
    """A worker environment with MALLOC_MMAP_THRESHOLD_ keeps glibc's setting: no mallopt."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", OVERRIDE: str(128 << 10)}
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout)
    assert not counts["applied"]
    assert counts["kept"] > counts["plain"] / 2  # still a fresh mmap per array


def test_workers_keep_memory_after_a_block(scheduler_address: str, tmp_path) -> None:
    config = jacrun.config_from_dict(
        job_config(str(tmp_path / "out.zarr"), cluster={"kind": "address", "address": scheduler_address})
    )
    summary = jacrun.submit(config, progress=False)
    assert summary.ok

    def applied() -> list[bool]:
        from jacrun import memory

        return list(memory._APPLIED)

    with Client(scheduler_address, set_as_default=False) as client:
        held = client.run(applied)
    assert [True] in held.values()  # the worker that ran the blocks
