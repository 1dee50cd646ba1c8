"""The only code that starts or connects to Dask clusters."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from jacrun.config import AddressClusterConfig, JobqueueClusterConfig, LocalClusterConfig
from jacrun.errors import ConfigError
from jacrun.memory import worker_environ


@contextlib.contextmanager
def connect(config: LocalClusterConfig | AddressClusterConfig | JobqueueClusterConfig) -> Iterator:
    """Yield a ``distributed.Client`` to the cluster the config section describes.

    Local clusters listen on 127.0.0.1 only (scheduler, workers and dashboard).
    """
    from distributed import Client, LocalCluster

    if isinstance(config, AddressClusterConfig):
        security = None
        if config.tls is not None:
            from distributed.security import Security

            security = Security(
                tls_ca_file=str(config.tls.ca_file),
                tls_client_cert=str(config.tls.cert_file),
                tls_client_key=str(config.tls.key_file),
                require_encryption=True,
            )
        with Client(config.address, security=security, timeout="30s", set_as_default=False) as client:
            yield client
        return
    if isinstance(config, JobqueueClusterConfig):
        with jobqueue_cluster(config) as cluster, Client(cluster, set_as_default=False) as client:
            cluster.scale(jobs=config.jobs)
            yield client
        return
    with (
        local_worker_settings(),
        _dashboard_port_warning_quiet(),
        LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            memory_limit=int(config.memory_limit),
            host="127.0.0.1",
            dashboard_address=config.dashboard,
            scheduler_kwargs=None if config.dashboard else NO_DASHBOARD,
            processes=True,
            silence_logs=logging.CRITICAL,  # jacrun reports failed blocks itself
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        if config.dashboard is None:
            cluster.sync(_stop_http_server, cluster.scheduler)
        yield client


NO_DASHBOARD = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
"""Scheduler options for ``dashboard: null``. Dask's scheduler starts an HTTP server (health,
metrics) even without a dashboard, on port 8787 by default: it starts on a free port instead,
and :func:`_stop_http_server` stops it, so that nothing listens."""


async def _stop_http_server(scheduler) -> None:
    """Stop the scheduler's HTTP server and forget it, so no dashboard link is advertised."""
    server = scheduler.services.pop("dashboard", None)
    if server is not None:
        server.stop()


@contextlib.contextmanager
def _dashboard_port_warning_quiet() -> Iterator[None]:
    """Dask warns (a UserWarning, with its file and source line) when the dashboard's port is
    taken and it serves on another: :func:`dashboard_line` says so in one line instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
        yield


def dashboard_line(
    config: LocalClusterConfig | AddressClusterConfig | JobqueueClusterConfig, link: str | None
) -> str:
    """What ``submit`` prints about the dashboard: its link, the port it moved from, or none."""
    if isinstance(config, LocalClusterConfig) and config.dashboard is None:
        return "Dashboard: off (cluster.dashboard is null)"
    if link is None:
        return "Dashboard: not available"
    wanted = int(config.dashboard.rpartition(":")[2]) if isinstance(config, LocalClusterConfig) else 0
    port = urlsplit(link).port
    if wanted and port is not None and port != wanted:
        return f"Dashboard: port {wanted} is taken; serving on {link}"
    return f"Dashboard: {link}"


LOCAL_INTERVALS: dict[str, str] = {
    "distributed.worker.profile.interval": "100ms",
    "distributed.admin.tick.interval": "1s",
}
"""Dask intervals for the local clusters jacrun starts, in place of Dask's 10 ms and 20 ms.

Each wakes an event loop (the workers', and the scheduler's and nannies' in this process),
and on a busy machine that time comes out of the blocks. The profiler walks the worker's
thread stacks on each sample: at 10 ms it took about 1.3% of a worker's CPU on an MLP job,
and one sample in 100 ms still profiles a job of minutes well. The tick only measures how
late the event loop runs, to warn when it was blocked for seconds (``admin.tick.limit``, 3 s):
at 20 ms, the tick callbacks of the two workers, the scheduler and both nannies ran 250 times
a second; at 1 s an idle local cluster uses a third less CPU and an 8N MLP job ran about 1.5%
faster (8 paired runs)."""


def _dask_defaults() -> dict:
    """Dask's own defaults, before any user config (a config for ``dask.config.get``)."""
    import dask

    merged: dict = {}
    for defaults in dask.config.defaults:
        dask.config.update(merged, defaults)
    return merged


@contextlib.contextmanager
def local_worker_settings() -> Iterator[None]:
    """Dask settings for the workers of a local cluster started inside the block.

    Their environment (:func:`jacrun.memory.worker_environ`), which Dask's nanny sets before it
    starts each worker process, restarts included; and :data:`LOCAL_INTERVALS`, each unless
    the user's Dask config already changed it. A variable that the environment or the Dask
    config (``pre-spawn-environ``, even as null) already sets is left as it is. The nanny
    also copies that whole environment, Dask's own variables included (``OMP_NUM_THREADS=1``
    and the like), into this process's ``os.environ``, where every program the caller starts
    later would inherit it: on exit all those variables are as they were before.
    """
    import dask
    import distributed  # noqa: F401 - loads Dask's distributed defaults into dask.config

    chosen = dask.config.get("distributed.nanny.pre-spawn-environ")  # the user's Dask config
    environ = {name: value for name, value in worker_environ().items() if name not in chosen}
    settings: dict[str, str] = {
        f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in environ.items()
    }
    defaults = _dask_defaults()
    for key, value in LOCAL_INTERVALS.items():
        if dask.config.get(key) == dask.config.get(key, config=defaults):
            settings[key] = value
    before = {name: os.environ.get(name) for name in {*chosen, *environ, _HASH_SEED}}
    # what the nanny writes: a config value where this process has none (Dask's own
    # _get_env_variables), and a hash seed of its own where there is none or "0"
    copied = {
        name: str(value)
        for name, value in {**chosen, **environ}.items()
        if value is not None and before[name] is None
    }
    try:
        with dask.config.set(settings):
            yield
    finally:
        for name, value in before.items():
            now = os.environ.get(name)
            if now == value:
                continue
            seeded = name == _HASH_SEED and value in (None, "0") and name not in copied
            if now != copied.get(name) and not seeded:
                continue  # set by the caller inside the block: theirs to keep
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_HASH_SEED = "PYTHONHASHSEED"
"""Dask's nanny also sets this one (to its own seed, where it is unset or "0"), outside its config."""


def blas_threads(config: LocalClusterConfig | AddressClusterConfig | JobqueueClusterConfig) -> int:
    """BLAS threads per worker thread, so that worker threads x BLAS threads <= the cores.

    A local cluster shares this machine's cores among its workers' threads; on other
    clusters each worker thread already has a core of its own (dask-jobqueue gives a job's
    worker processes cores / processes threads), so BLAS gets one thread per worker thread.
    """
    if isinstance(config, LocalClusterConfig):
        cores = os.cpu_count() or 1
        return max(1, cores // (config.workers * config.threads_per_worker))
    return 1


def check_launchable(config: LocalClusterConfig | AddressClusterConfig | JobqueueClusterConfig) -> None:
    """Refuse, before anything is written, a batch-system cluster this machine cannot submit to."""
    import shutil

    if isinstance(config, JobqueueClusterConfig):
        command = "sbatch" if config.kind == "slurm" else "qsub"
        if shutil.which(command) is None:
            raise ConfigError(
                f"cluster.kind: {config.kind} submits worker jobs with `{command}`, which is not on "
                "this machine's PATH; run jacrun on a login node, or use --scheduler ADDRESS"
            )


def quiet_dask_logs() -> None:
    """Silence distributed's own log records (tracebacks on reconnect attempts and shutdown races,
    some of them logged as CRITICAL).

    jacrun reports lost schedulers, failed blocks and interruptions itself, in one line each.
    Called by the CLI; library users keep their logging as configured.
    """
    import distributed  # noqa: F401 - importing it configures its loggers: override after

    for name in [*logging.root.manager.loggerDict, "distributed"]:
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(_SILENT)
    # LocalCluster raises and restores its handlers' levels around its life; a filter stays put
    for handler in logging.getLogger("distributed").handlers:
        handler.addFilter(_silent)


_SILENT = logging.CRITICAL + 10


def _silent(record: logging.LogRecord) -> bool:
    return record.levelno >= _SILENT


def jobqueue_kwargs(config: JobqueueClusterConfig) -> dict:
    """dask-jobqueue arguments for a SLURM or PBS cluster section."""
    kwargs = {
        "queue": config.queue,
        "account": config.account,
        "cores": config.cores,
        "processes": config.processes,
        "memory": f"{int(config.memory) // 2**20}MiB",
        "walltime": config.walltime,
        "interface": config.interface,
        "local_directory": config.local_directory,
        "job_extra_directives": list(config.job_extra_directives),
        "job_script_prologue": _prologue(config.kind, config.job_script_prologue),
        "silence_logs": "error",
    }
    return {key: value for key, value in kwargs.items() if value is not None}


def _prologue(kind: str, lines: Sequence[str]) -> list[str]:
    """The batch job's shell lines before its workers start.

    The user's lines (from the config, else from dask-jobqueue's own config, as dask-jobqueue
    would take them), after an export of each :func:`jacrun.memory.worker_environ` variable
    that keeps a value the job already has (sbatch passes the submitting environment on) and
    that is left out where the user's lines set the variable themselves.
    """
    import dask

    lines = list(lines) or list(
        dask.config.get(f"jobqueue.{kind}.job-script-prologue", None)
        or dask.config.get(f"jobqueue.{kind}.env-extra", None)
        or []
    )
    exports = [
        f'export {name}="${{{name}-{value}}}"'
        for name, value in worker_environ({}).items()
        if not any(name in line for line in lines)
    ]
    return [*exports, *lines]


def jobqueue_cluster(config: JobqueueClusterConfig):
    """An (unscaled) SLURMCluster or PBSCluster; ``job_script()`` shows what it would submit."""
    from dask_jobqueue import PBSCluster, SLURMCluster

    cls = SLURMCluster if config.kind == "slurm" else PBSCluster
    return cls(**jobqueue_kwargs(config))


def insecure_address_warning(address: str) -> str | None:
    """A warning for plain TCP to a host that is not loopback: traffic would be unencrypted."""
    scheme, _, rest = address.partition("://")
    host = rest.rsplit(":", 1)[0].strip("[]")
    if scheme == "tcp" and not (host.startswith("127.") or host in {"localhost", "::1"}):
        return (
            f"{address}: plain TCP to a remote scheduler is unencrypted; use tls:// with "
            "cluster.tls (ca_file, cert_file, key_file) on untrusted networks"
        )
    return None
