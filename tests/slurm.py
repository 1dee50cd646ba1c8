"""A real single-node SLURM for the tests: munged, slurmctld and slurmd for this host.

Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them), run as root with a generated
slurm.conf: ``proctrack/linuxproc``, ``task/none``, no cgroups, no accounting database, state,
spool, logs and munge's socket in a temporary folder, free ports. Started once per test session
(the ``slurm_cluster`` fixture) and stopped by pid file, also when a test fails. Where it cannot start,
the tests that use it skip with the reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CPUS = 8
"""CPUs the node declares (more than this machine may have: the test jobs mostly sleep)."""
MEMORY_MIB = 16384
"""Memory the node declares."""
MAX_MINUTES = 10
"""The partition's time limit."""
ACCOUNTS = ("jacrun",)
"""The accounts the submit filter accepts (any other is refused as SLURM's accounting refuses it)."""

JOB_SUBMIT_LUA = """\
-- Accounts this cluster charges. Without an accounting database SLURM accepts any account
-- name; this filter refuses the others with the error SLURM's accounting gives.
local accounts = {%s}

function slurm_job_submit(job_desc, part_list, submit_uid)
  if job_desc.account ~= nil and not accounts[job_desc.account] then
    return slurm.ESLURM_INVALID_ACCOUNT
  end
  return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
  return slurm.SUCCESS
end
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Slurm:
    """munged, slurmctld and slurmd in ``folder``; ``env`` is what SLURM's commands need."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = socket.gethostname()
        self.conf = folder / "slurm.conf"
        self.socket = folder / "munge" / "munge.socket"
        self.pid_files = {
            "slurmd": folder / "slurmd.pid",
            "slurmctld": folder / "slurmctld.pid",
            "munged": folder / "munge" / "munged.pid",
        }
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch") if not _which(name)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise RuntimeError("slurmd must run as root")
        self._start_munge()
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            command = [_which(daemon), "-f", str(self.conf)]
            if daemon == "slurmd":
                command += ["-N", self.host]
            self._run(command)
        self.wait_idle()

    def _start_munge(self) -> None:
        munge = self.folder / "munge"
        munge.mkdir()
        for folder in (self.folder, munge):  # munged insists: its socket's folders open to all,
            folder.chmod(0o755)  # its key to root alone
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        self._run(
            [
                _which("munged"),
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={self.pid_files['munged']}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ]
        )

    def _write_conf(self) -> None:
        for name in ("state", "spool", "log"):
            (self.folder / name).mkdir()
        accounts = ", ".join(f"{name} = true" for name in ACCOUNTS)
        (self.folder / "job_submit.lua").write_text(JOB_SUBMIT_LUA % accounts)
        folder = self.folder
        self.conf.write_text(
            f"""\
ClusterName=jacrun-tests
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={self.pid_files["slurmctld"]}
SlurmdPidFile={self.pid_files["slurmd"]}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobSubmitPlugins=lua
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
EnforcePartLimits=ALL
OverTimeLimit=0
KillWait=2
MinJobAge=60
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={MEMORY_MIB} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime={MAX_MINUTES} State=UP
"""
        )

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{Path(command[0]).name} did not start: {done.stderr.strip() or done.stdout}")

    def command(self, *args: str) -> str:
        """A SLURM command against this cluster; its stdout."""
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            try:
                state = self.command("sinfo", "--noheader", "--Node", "--format=%t").strip()
            except RuntimeError as exc:
                state = str(exc)
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the node did not become idle in {timeout:g} s (sinfo: {state!r})")

    def queue(self, folder: Path | None = None) -> list[str]:
        """The jobs SLURM lists (pending, running, completing) as ``id state``: all of them, or
        those submitted from ``folder`` (a test's jacrun runs there)."""
        lines = self.command("squeue", "--noheader", "--format=%i %T %Z").splitlines()
        where = None if folder is None else str(folder.resolve())
        return [line.rsplit(" ", 1)[0] for line in lines if where is None or line.endswith(f" {where}")]

    def wait_empty(self, folder: Path | None = None, timeout: float = 20) -> list[str]:
        """Wait until no job (from ``folder``) is listed: cancelled jobs pass through COMPLETING
        while their processes stop. The jobs still listed."""
        deadline = time.monotonic() + timeout
        while (left := self.queue(folder)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def running(self, folder: Path) -> list[str]:
        """Ids of the running jobs submitted from ``folder``."""
        return [job.split()[0] for job in self.queue(folder) if job.endswith(" RUNNING")]

    def stop(self) -> None:
        """Cancel every job, then stop the daemons by pid file (each waited for, then killed)."""
        if self.pid_files["slurmctld"].exists():
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
            self.wait_empty(timeout=10)
        _stop([self.pid_files["slurmd"], self.pid_files["slurmctld"]])
        _stop([self.pid_files["munged"]])  # last: the SLURM daemons talk to it on their way out


def _which(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or ""


def _stop(pid_files: list[Path], timeout: float = 10) -> None:
    """SIGTERM to each daemon of ``pid_files``, then SIGKILL to any still there after ``timeout``."""
    pids = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):  # no pid file, or the daemon is gone
            continue
        pids.append(pid)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def running_slurm() -> Iterator[Slurm]:
    """A running SLURM (the ``slurm_cluster`` fixture of conftest.py, once per session):
    ``SLURM_CONF`` points SLURM's commands (and jacrun) at it, and jacrun looks at the queue
    every second. Stopped by pid file at the end, however the tests went."""
    folder = Path(tempfile.mkdtemp(prefix="jacrun-slurm-"))
    cluster = Slurm(folder)
    before = {name: os.environ.get(name) for name in ("SLURM_CONF", "JACRUN_SLURM_POLL_SECONDS")}
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            reason = f"no SLURM for the tests: {exc}"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{reason} (CI=true: the SLURM tests must run)")
            pytest.skip(reason)
        os.environ.update(SLURM_CONF=str(cluster.conf), JACRUN_SLURM_POLL_SECONDS="1")
        yield cluster
    finally:
        cluster.stop()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)
