"""A run's SLURM batch jobs: requests SLURM refuses become config errors, ``jobs`` batch jobs
are kept alive while blocks remain, and every batch job a run submitted is cancelled when it ends.

dask-jobqueue renders the job script and its cluster hosts the scheduler (``jacrun.cluster``);
this module calls ``sbatch``, ``squeue``, ``scancel`` and ``sinfo`` itself, so that it knows every
job id it submitted, SLURM's reason for a refusal or a pending job, and when a batch job ends
(walltime, ``scancel``, node failure, preemption, or its workers retiring), whatever ended it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from jacrun.config import JobqueueClusterConfig
from jacrun.errors import ConfigError

log = logging.getLogger("jacrun")

WORKER_PREFIX = "jacrun-"
"""Workers are named ``jacrun-$SLURM_JOB_ID`` (``-0``, ``-1``, ... with several per batch job),
so the scheduler's worker names say which batch job each worker runs in."""

WORKER_NAME = WORKER_PREFIX + "${SLURM_JOB_ID}"
"""The ``--name`` of the workers in the job script (the batch job's shell expands it)."""

ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "COMPLETING",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
    "TIMEOUT",
}
"""Batch job states after which its workers are gone or going (COMPLETING: its processes are
being stopped). Any other state (PENDING, RUNNING, REQUEUED, ...) counts as alive."""

COMMAND_SECONDS = 60
"""How long one sbatch, squeue, scancel or sinfo call may take."""


def poll_seconds() -> float:
    """Seconds between two looks at the queue (``JACRUN_SLURM_POLL_SECONDS``, default 5)."""
    return float(os.environ.get("JACRUN_SLURM_POLL_SECONDS", "5"))


# ---- walltime and worker lifetime -------------------------------------------------------------


def walltime_seconds(walltime: str) -> int:
    """A walltime as SLURM reads it (``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``), in seconds, rounded up to whole minutes as SLURM does."""
    days, _, clock = walltime.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    total = (int(days or 0) * 24 + hours) * 3600 + minutes * 60 + seconds
    return max(60, math.ceil(total / 60) * 60)


def worker_lifetime(walltime: str) -> tuple[int, int]:
    """(lifetime, stagger) in seconds for Dask's ``--lifetime`` and ``--lifetime-stagger``.

    A worker retires gracefully after lifetime +/- stagger (staggered so that a run's workers do
    not all leave at once), which leaves a reserve of a tenth of the walltime (at least 20 s, at
    most 10 minutes) for the worker's start and its graceful exit before SLURM's kill.
    """
    wall = walltime_seconds(walltime)
    reserve = min(max(wall // 10, 20), 600)
    stagger = min(max(wall // 20, 1), 300)
    return wall - reserve - stagger, stagger


def worker_arguments(walltime: str) -> list[str]:
    """The ``dask worker`` options that retire workers before the walltime."""
    lifetime, stagger = worker_lifetime(walltime)
    return ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{stagger}s"]


# ---- running SLURM's commands -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: int
    out: str
    err: str

    @property
    def reason(self) -> str:
        """SLURM's message, without the command's prefixes: ``Invalid partition name specified``."""
        prefixes = (
            "sbatch: error: ",
            "sbatch: fatal: ",
            "Batch job submission failed: ",
            "allocation failure: ",
            "error: ",
        )
        reasons: list[str] = []
        for line in self.err.splitlines():
            text = line.strip()
            for prefix in prefixes:
                text = text.removeprefix(prefix)
            if text and text not in reasons:
                reasons.append(text)
        return "; ".join(reasons) or f"exit code {self.code}"


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until a submission or cancellation has finished, so that its job
    id is known (and cancelled) whatever interrupts the run. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def call(command: Sequence[str], stdin: str | None = None) -> Reply:
    """Run one SLURM command in its own session (a Ctrl-C at the terminal does not kill it half-way)."""
    try:
        done = subprocess.run(
            list(command),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_SECONDS,
            start_new_session=True,
        )
    except FileNotFoundError:
        return Reply(127, "", f"{command[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Reply(124, "", f"{command[0]} did not answer within {COMMAND_SECONDS} s")
    return Reply(done.returncode, done.stdout, done.stderr)


def sbatch(script: str, *options: str) -> Reply:
    return call(["sbatch", "--parsable", *options], stdin=script)


def scancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        reply = call(["scancel", *job_ids])
        if reply.code and "Invalid job id" not in reply.err:
            log.warning("scancel %s: %s", " ".join(job_ids), reply.reason)


def queue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, reason)} of those of ``job_ids`` SLURM still knows; None when squeue fails."""
    if not job_ids:
        return {}
    reply = call(["squeue", "--noheader", "--states=all", "--format=%i|%T|%r", f"--jobs={','.join(job_ids)}"])
    if reply.code:
        return {} if "Invalid job id" in reply.err else None
    states = {}
    for line in reply.out.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        states[job] = (state, reason)
    return states


# ---- refusals -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """A partition's limits as sinfo reports them (None: unlimited or unknown)."""

    name: str
    time_limit: str
    max_cpus: int | None
    max_memory_mib: int | None

    @property
    def time_seconds(self) -> int | None:
        if self.time_limit in {"infinite", "n/a", ""}:
            return None
        try:
            return walltime_seconds(self.time_limit)
        except ValueError:
            return None


def partition(queue: str | None) -> Partition | None:
    """The named (or default) partition's limits, from sinfo; None when sinfo does not list it."""
    reply = call(["sinfo", "--noheader", "--Node", "--format=%P|%l|%c|%m"])
    if reply.code:
        return None
    lines = [line.strip().split("|") for line in reply.out.splitlines() if line.count("|") == 3]
    if queue is None:
        lines = [line for line in lines if line[0].endswith("*")]
    else:
        lines = [line for line in lines if line[0].rstrip("*") == queue]
    if not lines:
        return None

    def most(values: list[str]) -> int | None:
        numbers = [int(v.rstrip("+")) for v in values if v.rstrip("+").isdigit()]
        return max(numbers) if numbers else None

    return Partition(
        lines[0][0].rstrip("*"),
        lines[0][1],
        most([line[2] for line in lines]),
        most([line[3] for line in lines]),
    )


def check_request(config: JobqueueClusterConfig, script: str) -> None:
    """Refuse, with SLURM's own reason, a batch job SLURM would refuse or never start.

    ``sbatch --test-only`` validates the job script without submitting anything (partition,
    account, cores, memory, walltime, extra directives); sinfo's limits of the partition name
    the key at fault, and catch what a site that does not enforce its limits at submission would
    leave pending for ever.
    """
    limits = partition(config.queue)
    reply = sbatch(script, "--test-only")
    if reply.code:
        raise ConfigError(refusal(config, reply.reason, limits))
    if limits is None:
        return
    wall = walltime_seconds(config.walltime)
    if limits.time_seconds is not None and wall > limits.time_seconds:
        raise ConfigError(
            f"cluster.walltime: {config.walltime} exceeds partition {limits.name}'s time limit "
            f"{limits.time_limit} (sinfo); SLURM would keep the batch jobs pending"
        )
    if limits.max_cpus is not None and config.cores > limits.max_cpus:
        raise ConfigError(
            f"cluster.cores: {config.cores} cores per batch job, but the nodes of partition "
            f"{limits.name} have at most {limits.max_cpus} (sinfo); SLURM would keep the batch jobs pending"
        )
    if limits.max_memory_mib is not None and int(config.memory) > limits.max_memory_mib * 2**20:
        raise ConfigError(
            f"cluster.memory: {_size(int(config.memory))} per batch job, but the nodes of partition "
            f"{limits.name} have at most {limits.max_memory_mib} MiB (sinfo); SLURM would keep the "
            "batch jobs pending"
        )


def refusal(config: JobqueueClusterConfig, reason: str, limits: Partition | None) -> str:
    """One line for a refused batch job: the ``cluster.*`` key at fault and SLURM's reason, quoted.

    SLURM's "Requested node configuration is not available" may mean cores or memory: the
    partition's limits (sinfo) say which.
    """
    text = reason.lower()
    quoted = f'"{reason}"'
    cpus = limits.max_cpus if limits else None
    memory = limits.max_memory_mib if limits else None
    too_many_cores = cpus is not None and config.cores > cpus
    too_much_memory = memory is not None and int(config.memory) > memory * 2**20
    unreachable = ("contact slurm controller", "command not found", "configuration source")
    if any(words in text for words in unreachable):
        last = reason.split("; ")[-1]  # the conclusion, after the attempts that led to it
        return f'cluster.kind: slurm: sbatch cannot submit from here: "{last}"; run jacrun on a login node'
    if "partition" in text and "account" not in text:
        if config.queue is None:
            return f"cluster.queue: SLURM has no default partition: {quoted}; set cluster.queue"
        return f"cluster.queue: SLURM refuses partition {config.queue!r}: {quoted}"
    if "account" in text:
        given = f"account {config.account!r}" if config.account else "a batch job without an account"
        return f"cluster.account: SLURM refuses {given}: {quoted}"
    if "time limit" in text or "--time" in text or "timelimit" in text:
        limit = f" (partition {limits.name}'s limit is {limits.time_limit})" if limits else ""
        return f"cluster.walltime: SLURM refuses {config.walltime}: {quoted}{limit}"
    if ("memory" in text or too_much_memory) and not too_many_cores:
        most = f" (partition {limits.name}'s nodes have at most {memory} MiB)" if memory else ""
        return f"cluster.memory: SLURM refuses {_size(int(config.memory))} per batch job: {quoted}{most}"
    if "processor" in text or "cpu" in text or too_many_cores:
        most = f" (partition {limits.name}'s nodes have at most {cpus} CPUs)" if cpus else ""
        return f"cluster.cores: SLURM refuses {config.cores} cores per batch job: {quoted}{most}"
    if config.job_extra_directives:
        return f"cluster.job_extra_directives: SLURM refuses the batch job: {quoted}"
    return f"cluster: SLURM refuses the batch job: {quoted}"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:g}{unit}"
    return f"{nbytes}B"


# ---- keeping batch jobs alive -------------------------------------------------------------------


class Watcher(Protocol):
    """What the run tells the batch jobs, and what they tell the run."""

    def notice(self, text: str) -> None:
        """Show the queue's state (pending jobs and SLURM's reason, replacements) on the terminal."""

    def give_up(self, reason: str) -> None:
        """End the run (exit 1 with this one line): its workers never arrive."""

    def blocks_left(self) -> int:
        """Blocks not yet done; no more batch jobs are kept than they can use."""


@dataclass
class BatchJob:
    job_id: str
    state: str = "PENDING"
    reason: str = ""
    joined: bool = False
    """A worker of this batch job joined the scheduler."""


class BatchJobs:
    """The run's batch jobs: ``jobs`` of them alive while blocks remain, each replaced when it ends.

    Enter it to submit the first batch jobs (a refusal raises ConfigError) and start watching the
    queue on a thread; leaving it cancels every batch job it submitted, on any exit.
    """

    def __init__(
        self,
        config: JobqueueClusterConfig,
        script: str,
        worker_names: Callable[[], Sequence[str]],
        watcher: Watcher,
    ) -> None:
        self.config = config
        self.script = script
        self.worker_names = worker_names
        self.watcher = watcher
        self.cores = config.cores
        self.alive: list[BatchJob] = []
        self.submitted: list[str] = []
        """Every batch job id this run submitted: all of them are cancelled at the end."""
        self.failed_starts = 0
        """Batch jobs in a row that ended (or could not be submitted) before a worker of theirs joined."""
        self.last_failure = ""
        self.any_joined = False
        self.started = time.monotonic()
        self._last_notice = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jacrun-slurm", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> BatchJobs:
        try:
            for _ in range(self.wanted()):
                reply = self._submit()
                if reply is not None:
                    raise ConfigError(refusal(self.config, reply.reason, partition(self.config.queue)))
            self._report([], [])
            self._thread.start()
        except BaseException:
            self.cancel()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop watching and cancel every batch job this run submitted (a second Ctrl-C or SIGTERM
        waits until they are)."""
        with _signals_held():
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(COMMAND_SECONDS + 5)
            with self._lock:
                scancel(self.submitted)
                self.alive = []

    @property
    def limit(self) -> int:
        """Failed starts in a row after which the run gives up."""
        return max(3, self.config.jobs)

    def wanted(self) -> int:
        """Batch jobs to keep: ``jobs``, or fewer when fewer blocks are left than they have cores."""
        return min(self.config.jobs, math.ceil(max(self.watcher.blocks_left(), 0) / self.cores))

    def _submit(self) -> Reply | None:
        """Submit one batch job; the refusal, if SLURM refused it. A Ctrl-C or SIGTERM waits until
        the job's id is recorded, so that it is cancelled."""
        with _signals_held():
            reply = sbatch(self.script)
            if reply.code:
                return reply
            job_id = reply.out.strip().split(";")[0]
            with self._lock:
                self.submitted.append(job_id)
                self.alive.append(BatchJob(job_id))
        return None

    def _watch(self) -> None:
        while not self._stop.wait(poll_seconds()):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watch goes on; the next look may succeed
                log.warning("could not check the batch jobs: %s", exc)

    def check(self) -> None:
        """One look at the queue and the scheduler: note joins, replace ended jobs, give up if need be."""
        with self._lock:
            ids = [job.job_id for job in self.alive]
        states = queue_states(ids)
        if states is None or self._stop.is_set():
            return  # squeue failed: look again later
        joined = set(self._joined_jobs())
        ended: list[BatchJob] = []
        with self._lock:
            for job in list(self.alive):
                if job.job_id in joined:
                    job.joined = self.any_joined = True
                    self.failed_starts = 0
                state, reason = states.get(job.job_id, ("ENDED", ""))
                job.state, job.reason = state, reason
                if state in ENDED or job.job_id not in states:
                    self.alive.remove(job)
                    ended.append(job)
                    if not job.joined:
                        self.failed_starts += 1
                        self.last_failure = f"the last, {job.job_id}: {state}"
        if self._gave_up():
            return
        replacements: list[str] = []
        while len(self.alive) < self.wanted() and not self._stop.is_set():
            reply = self._submit()
            if reply is not None:
                self.failed_starts += 1
                self.last_failure = f'the last refused by sbatch: "{reply.reason}"'
                if self._gave_up():
                    return
                break
            replacements.append(self.alive[-1].job_id)
        self._cancel_unneeded()
        self._report(ended, replacements)

    def _joined_jobs(self) -> Iterator[str]:
        pattern = re.compile(re.escape(WORKER_PREFIX) + r"(\d+)(?:-\d+)?$")
        for name in self.worker_names():
            match = pattern.match(str(name))
            if match:
                yield match.group(1)

    def _gave_up(self) -> bool:
        """Give up on workers that never arrive; True when the run was told to end."""
        timeout = self.config.startup_timeout
        if self.failed_starts >= self.limit:
            cwd = os.getcwd()
            self.watcher.give_up(
                f"cluster: {self.failed_starts} batch jobs in a row ended before any of their workers "
                f"joined the scheduler ({self.last_failure}); see their output, slurm-<job id>.out in {cwd}"
            )
        elif not self.any_joined and timeout is not None and time.monotonic() - self.started > timeout:
            self.watcher.give_up(
                f"cluster.startup_timeout: no worker joined within {_duration(timeout)} "
                f"({self._queue_state() or 'no batch job in the queue'}); its batch jobs were "
                "cancelled. Raise cluster.startup_timeout to wait longer"
            )
        else:
            return False
        self._stop.set()
        return True

    def _cancel_unneeded(self) -> None:
        """Cancel pending batch jobs beyond what the blocks left can use (the newest first)."""
        extra = len(self.alive) - self.wanted()
        pending = [job for job in reversed(self.alive) if job.state == "PENDING"][: max(extra, 0)]
        if pending:
            scancel([job.job_id for job in pending])
            with self._lock:
                self.alive = [job for job in self.alive if job not in pending]

    def _queue_state(self) -> str:
        running = sum(job.state == "RUNNING" for job in self.alive)
        pending = [job for job in self.alive if job.state != "RUNNING"]
        reasons = sorted({job.reason for job in pending if job.reason and job.reason != "None"})
        parts = [f"{running} running"] if running else []
        if pending:
            parts.append(f"{len(pending)} pending" + (f" ({', '.join(reasons)})" if reasons else ""))
        return ", ".join(parts)

    def _report(self, ended: list[BatchJob], replacements: list[str]) -> None:
        text = "batch jobs: " + (self._queue_state() or "none")
        if replacements:
            why = ", ".join(f"{job.job_id} {job.state}" for job in ended) or "ended"
            text = (
                f"batch jobs: replacing workers: {why}; submitted {', '.join(replacements)}; "
                + self._queue_state()
            )
        if text != self._last_notice:
            self._last_notice = text
            self.watcher.notice(text)


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
