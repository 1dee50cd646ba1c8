"""The only code that starts or connects to Dask clusters."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from jacrun import slurm
from jacrun.config import AddressClusterConfig, JobqueueClusterConfig, LocalClusterConfig
from jacrun.errors import ConfigError


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM that arrives while a cluster starts until it has started, then
    deliver it. Interrupted half-way, a cluster object exists that no ``with`` closes (Dask
    closes it at exit, with a traceback); delivered here, the caller's ``with`` closes it.
    A second one is not held: it takes effect at once. Python-level handlers, not a signal
    mask: the workers started meanwhile would inherit a mask. Main thread only (elsewhere
    signals cannot be handled)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: object) -> None:
        if caught:  # pressed again: do not wait any longer
            for held, handler in previous.items():
                signal.signal(held, handler)
            signal.raise_signal(signum)
        caught.append(signum)

    previous.update({signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)})
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        signal.raise_signal(caught[0])  # the caller's handler, as if it arrived now


@contextlib.contextmanager
def connect(
    config: LocalClusterConfig | AddressClusterConfig | JobqueueClusterConfig,
    watcher: slurm.Watcher | None = None,
) -> Iterator:
    """Yield a ``distributed.Client`` to the cluster the config section describes.

    Local clusters listen on 127.0.0.1 only (scheduler, workers and dashboard); batch clusters
    serve their dashboard on loopback unless ``cluster.dashboard`` says otherwise. A SLURM
    cluster's batch jobs are jacrun's own (:class:`jacrun.slurm.BatchJobs`): ``watcher`` hears
    the queue's state, ends the run if workers never arrive, and says how many blocks are left.
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
        with _dashboard_port_warning_quiet(), contextlib.ExitStack() as started:
            with interrupts_deferred():
                cluster = started.enter_context(jobqueue_cluster(config))
                client = started.enter_context(Client(cluster, set_as_default=False))
            if config.dashboard is None:
                cluster.sync(_stop_http_server, cluster.scheduler)
            if config.kind == "pbs":
                cluster.scale(jobs=config.jobs)
                yield client
                return
            script = job_script(config, cluster.scheduler.address)
            with slurm.BatchJobs(config, script, lambda: _worker_names(client), watcher or _Quiet()):
                yield client
        return
    with local_worker_settings(), _dashboard_port_warning_quiet(), contextlib.ExitStack() as started:
        with interrupts_deferred():
            cluster = started.enter_context(
                LocalCluster(
                    n_workers=config.workers,
                    threads_per_worker=config.threads_per_worker,
                    memory_limit=int(config.memory_limit),
                    host="127.0.0.1",
                    dashboard_address=config.dashboard,
                    scheduler_kwargs=None if config.dashboard else NO_DASHBOARD,
                    processes=True,
                    silence_logs=logging.CRITICAL,  # jacrun reports failed blocks itself
                )
            )
            client = started.enter_context(Client(cluster, set_as_default=False))
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


def dashboard_link(
    config: LocalClusterConfig | AddressClusterConfig | JobqueueClusterConfig, client
) -> str | None:
    """The dashboard's address as a browser on this machine reaches it (None: no dashboard).

    Dask builds the link from the scheduler's address; a batch cluster's dashboard listens on
    ``cluster.dashboard``'s host (loopback by default), which is where the link must point.
    """
    try:
        if not client.scheduler_info().get("services", {}).get("dashboard"):
            return None
        link = client.dashboard_link
    except Exception:  # noqa: BLE001 - a missing dashboard is not an error
        return None
    if isinstance(config, JobqueueClusterConfig) and config.dashboard is not None:
        host = config.dashboard.rpartition(":")[0].strip("[]")
        if host not in _ALL_INTERFACES:
            parts = urlsplit(link)
            link = parts._replace(netloc=f"{host}:{parts.port}").geturl()
    return link


_ALL_INTERFACES = {"", "0.0.0.0", "::"}


def dashboard_line(
    config: LocalClusterConfig | AddressClusterConfig | JobqueueClusterConfig, link: str | None
) -> str:
    """What ``submit`` prints about the dashboard: its link, the port it moved from, or none; for
    a batch cluster's dashboard on loopback, the ssh tunnel that reaches it from another machine."""
    if isinstance(config, LocalClusterConfig | JobqueueClusterConfig) and config.dashboard is None:
        return "Dashboard: off (cluster.dashboard is null)"
    if link is None:
        return "Dashboard: not available"
    wanted = 0
    if isinstance(config, LocalClusterConfig | JobqueueClusterConfig):
        wanted = int(config.dashboard.rpartition(":")[2])
    parts = urlsplit(link)
    port = parts.port
    moved = f"port {wanted} is taken; serving on " if wanted and port is not None and port != wanted else ""
    line = f"Dashboard: {moved}{link}"
    if isinstance(config, JobqueueClusterConfig) and (parts.hostname or "").startswith("127."):
        line += f" (from another machine: ssh -L {port}:127.0.0.1:{port} {socket.gethostname()})"
    return line


@contextlib.contextmanager
def local_worker_settings() -> Iterator[None]:
    """Leave this process's environment as it was around a local cluster started inside the block.

    Dask's nanny copies the variables it sets for its workers (``distributed.nanny.pre-spawn-environ``:
    ``OMP_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_`` and the like), and a ``PYTHONHASHSEED`` of
    its own, into this process's ``os.environ``, where every program the caller starts later
    would inherit them: on exit they are as they were before. A variable the caller set inside
    the block is theirs to keep. jacrun adds no Dask setting or variable of its own for its
    workers (docs/performance.md lists every setting it does impose, and why).
    """
    import dask
    import distributed  # noqa: F401 - loads Dask's distributed defaults into dask.config

    chosen = dask.config.get("distributed.nanny.pre-spawn-environ")  # Dask's, or the user's
    before = {name: os.environ.get(name) for name in {*chosen, _HASH_SEED}}
    # what the nanny writes: a config value where this process has none (Dask's own
    # _get_env_variables), and a hash seed of its own where there is none or "0"
    copied = {
        name: str(value) for name, value in chosen.items() if value is not None and before[name] is None
    }
    try:
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
    """Refuse, before anything is written, a batch-system cluster this machine cannot submit to,
    and a SLURM batch job that SLURM refuses (``sbatch --test-only``: nothing is submitted)."""
    import shutil

    if isinstance(config, JobqueueClusterConfig):
        command = "sbatch" if config.kind == "slurm" else "qsub"
        if shutil.which(command) is None:
            raise ConfigError(
                f"cluster.kind: {config.kind} submits worker jobs with `{command}`, which is not on "
                "this machine's PATH; run jacrun on a login node, or use --scheduler ADDRESS"
            )
        if config.kind == "slurm":
            slurm.check_request(config, job_script(config, "tcp://scheduler:8786"))


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
    """dask-jobqueue's arguments for each batch job of a SLURM or PBS cluster section.

    SLURM workers also get a lifetime shorter than the walltime (:func:`jacrun.slurm.worker_arguments`),
    after Dask's own ``worker-extra-args``.
    """
    import dask

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
    }
    if config.kind == "slurm":
        extra = list(dask.config.get("jobqueue.slurm.worker-extra-args", None) or [])
        kwargs["worker_extra_args"] = [*extra, *slurm.worker_arguments(config.walltime)]
    return {key: value for key, value in kwargs.items() if value is not None}


def _prologue(kind: str, lines: Sequence[str]) -> list[str]:
    """The batch job's shell lines before its workers start: the config's, else dask-jobqueue's
    own config (``job-script-prologue``, or the older ``env-extra``), as dask-jobqueue would take them."""
    import dask

    return list(lines) or list(
        dask.config.get(f"jobqueue.{kind}.job-script-prologue", None)
        or dask.config.get(f"jobqueue.{kind}.env-extra", None)
        or []
    )


def import_jobqueue():  # noqa: ANN201 - the dask_jobqueue module
    """dask_jobqueue, without the Ctrl-C handler it sets on import (its ``runner`` module makes
    SIGINT call ``sys.exit()``: a Ctrl-C would end ``jacrun submit`` as if it had succeeded,
    exit 0, the run not recorded as interrupted). Python's own handling is put back."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    import dask_jobqueue
    import dask_jobqueue.slurm

    if main and previous is not None and signal.getsignal(signal.SIGINT) is not previous:
        signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


def jobqueue_cluster(config: JobqueueClusterConfig):
    """An (unscaled) SLURMCluster or PBSCluster: the scheduler, with its dashboard where
    ``cluster.dashboard`` says; ``job_script()`` shows the batch script of its workers."""
    import dask

    jobqueue = import_jobqueue()
    cls = jobqueue.SLURMCluster if config.kind == "slurm" else jobqueue.PBSCluster
    options = dict(dask.config.get(f"jobqueue.{config.kind}.scheduler-options", None) or {})
    if config.dashboard is None:
        options.update(NO_DASHBOARD)
    else:
        options["dashboard_address"] = config.dashboard
    return cls(**jobqueue_kwargs(config), silence_logs="error", scheduler_options=options)


def job_script(config: JobqueueClusterConfig, scheduler: str) -> str:
    """The batch script of one SLURM batch job of this run, as submitted: dask-jobqueue's, with
    its workers named after the batch job (``jacrun-$SLURM_JOB_ID``)."""
    job = import_jobqueue().slurm.SLURMJob(scheduler, name=slurm.WORKER_NAME, **jobqueue_kwargs(config))
    return job.job_script()


def _worker_names(client) -> list[str]:
    """The names of the workers connected to the scheduler now."""
    return [str(info.get("name")) for info in client.scheduler_info()["workers"].values()]


class _Quiet:
    """The watcher of a SLURM cluster connected without one: it logs, and keeps ``jobs`` batch jobs."""

    def notice(self, text: str) -> None:
        logging.getLogger("jacrun").info("%s", text)

    def give_up(self, reason: str) -> None:
        logging.getLogger("jacrun").error("%s", reason)

    def blocks_left(self) -> int:
        return 2**31


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
