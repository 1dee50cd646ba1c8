"""Helpers shared by the tests: job configs, the CLI in a subprocess, relative errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(folder: Path, config: dict, name: str = "job.yaml") -> Path:
    """Write ``config`` as YAML into ``folder`` and return the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def job_config(store: str = "out.zarr", **sections) -> dict:
    """A small valid job (linear 5 -> 3, vjp, 3 random cotangents) with sections replaced."""
    config = {
        "name": "test",
        "mode": "vjp",
        "function": {"kind": "linear", "n_in": 5, "n_out": 3, "seed": 0},
        "inputs": {"kind": "random", "samples": 100, "seed": 1},
        "vectors": {"kind": "random", "count": 3, "seed": 2},
        "output": {"store": store},
        "chunks": {"samples": 32},
        "cluster": {"kind": "local", "workers": 1, "memory_limit": "1GiB", "dashboard": None},
    }
    for key, value in sections.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real ``jacrun`` command in a subprocess."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jacrun", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (the scale-free error used throughout the tests)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
