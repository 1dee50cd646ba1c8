"""jacrun: distributed batch Jacobian products (VJPs, JVPs, per-sample Jacobians) on Dask.

The public API::

    cfg  = jacrun.load_config("job.yaml", overrides={"chunks.samples": 1024})
    plan = jacrun.plan(cfg)            # frozen Plan, no side effects
    res  = jacrun.submit(cfg)          # runs the job; returns a Summary
    ds   = jacrun.load("results/job.zarr")
    J    = jacrun.jacobian("results/sparse.zarr", 0)   # one sample's scipy.sparse.csr_array
    f    = jacrun.build_function({"kind": "mlp", "sizes": [4, 8, 2], "seed": 0})
"""

from __future__ import annotations

from jacrun._version import __version__
from jacrun.api import check_job, jacobian, jacobians, load, plan, submit
from jacrun.checks import check
from jacrun.config import JobConfig, config_from_dict, load_config
from jacrun.errors import ConfigError, JacrunError, JobFailed
from jacrun.functions import Function, FunctionSpec, build_function, register
from jacrun.plan import Plan

__all__ = [
    "__version__",
    "ConfigError",
    "Function",
    "FunctionSpec",
    "JacrunError",
    "JobConfig",
    "JobFailed",
    "Plan",
    "build_function",
    "check",
    "check_job",
    "config_from_dict",
    "jacobian",
    "jacobians",
    "load",
    "load_config",
    "plan",
    "register",
    "submit",
]
