"""Cluster kinds: TLS to a real scheduler, SLURM/PBS job scripts, BLAS threads, warnings."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import jacrun
from jacrun.cluster import blas_threads, connect, insecure_address_warning, jobqueue_cluster
from jacrun.config import JobqueueClusterConfig, LocalClusterConfig, config_from_dict
from jacrun.errors import ConfigError
from tests.helpers import DaskProcesses, job_config, write_config

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/environ")
ONE_WORKER = LocalClusterConfig(workers=1, memory_limit="1GiB", dashboard=None)


def make_certificates(folder: Path) -> dict[str, str]:
    """A CA and one certificate it signed for 127.0.0.1, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, issuer_name, issuer_key, key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jacrun test CA")])
    ca = build("jacrun test CA", ca_name, ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("127.0.0.1", ca_name, ca_key, key, ca=False)
    files = {
        "ca_file": folder / "ca.pem",
        "cert_file": folder / "cert.pem",
        "key_file": folder / "key.pem",
    }
    files["ca_file"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert_file"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key_file"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {name: str(path) for name, path in files.items()}


def test_tls_scheduler_end_to_end(tmp_path):
    from distributed.security import Security

    tls = make_certificates(tmp_path)
    flags = ["--tls-ca-file", tls["ca_file"], "--tls-cert", tls["cert_file"], "--tls-key", tls["key_file"]]
    security = Security(
        tls_ca_file=tls["ca_file"], tls_client_cert=tls["cert_file"], tls_client_key=tls["key_file"]
    )
    processes = DaskProcesses(tmp_path, flags, security)
    try:
        address = processes.start_scheduler(protocol="tls")
        assert address.startswith("tls://127.0.0.1:")
        processes.start_workers(1)
        cfg = config_from_dict(
            job_config(cluster={"kind": "address", "address": address, "tls": tls}), tmp_path
        )
        summary = jacrun.submit(cfg, progress=False)
        assert summary.ok
        ds = jacrun.load(cfg.output.store)
        assert np.isfinite(ds.vjp.values).all()

        plain = config_from_dict(
            job_config(cluster={"kind": "address", "address": address}, output={"store": "x.zarr"}),
            tmp_path,
        )
        with pytest.raises(Exception):  # noqa: B017 - no certificate, no connection
            jacrun.submit(plain, progress=False)
    finally:
        processes.stop()


def test_missing_tls_files_are_config_errors(tmp_path):
    raw = job_config(
        cluster={
            "kind": "address",
            "address": "tls://127.0.0.1:8786",
            "tls": {"ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "k.pem"},
        }
    )
    with pytest.raises(ConfigError, match="cluster.tls.ca_file: no such file"):
        jacrun.load_config(write_config(tmp_path, raw))


@pytest.mark.parametrize(
    ("address", "warns"),
    [
        ("tcp://10.1.2.3:8786", True),
        ("tcp://scheduler.example.org:8786", True),
        ("tcp://127.0.0.1:8786", False),
        ("tcp://localhost:8786", False),
        ("tls://10.1.2.3:8786", False),
    ],
)
def test_plain_tcp_to_a_remote_host_warns(address, warns):
    message = insecure_address_warning(address)
    assert (message is not None) == warns
    if warns:
        assert "unencrypted" in message


def test_scheduler_override_replaces_the_cluster(tmp_path):
    from jacrun.config import with_scheduler

    cfg = with_scheduler(config_from_dict(job_config(), tmp_path), "tcp://127.0.0.1:8786")
    assert cfg.cluster.kind == "address" and cfg.cluster.address == "tcp://127.0.0.1:8786"
    with pytest.raises(ConfigError, match="--scheduler"):
        with_scheduler(cfg, "not an address")


@pytest.mark.parametrize(
    ("kind", "directives"),
    [
        (
            "slurm",
            ["#SBATCH -p compute", "#SBATCH -A proj1", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=4"],
        ),
        ("pbs", ["#PBS -q compute", "#PBS -A proj1", "#PBS -l walltime=02:00:00", "ncpus=4"]),
    ],
)
def test_jobqueue_job_scripts(tmp_path, kind, directives):
    raw = job_config(
        cluster={
            "kind": kind,
            "queue": "compute",
            "account": "proj1",
            "cores": 4,
            "processes": 2,
            "memory": "8GiB",
            "walltime": "02:00:00",
            "jobs": 3,
            "job_script_prologue": ["module load python"],
        }
    )
    cfg = jacrun.load_config(write_config(tmp_path, raw))
    assert cfg.cluster.workers == 6 and cfg.cluster.memory_limit == 4 * 2**30
    cluster = jobqueue_cluster(cfg.cluster)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for directive in [*directives, "module load python", "--nworkers 2", "--nthreads 2"]:
        assert directive in script, script


def test_a_prologue_from_dask_jobqueues_config_still_counts():
    """With no job_script_prologue in the job's config, dask-jobqueue's own config supplies
    the lines, as it would without jacrun."""
    import dask
    import dask_jobqueue  # noqa: F401 - its defaults first: set() would drop all of them on exit

    with dask.config.set({"jobqueue.slurm.job-script-prologue": ["module load site-python"]}):
        cluster = jobqueue_cluster(JobqueueClusterConfig(kind="slurm"))
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert "module load site-python" in script and "GLIBC_TUNABLES" not in script, script


def _started_with(name: str) -> str | None:
    """``name`` in the environment this process started with (what glibc read), not as
    changed since (Dask's worker also copies its nanny's environment in after it starts)."""
    with open("/proc/self/environ", "rb") as environ:
        for entry in environ.read().split(b"\0"):
            key, _, value = entry.decode().partition("=")
            if key == name:
                return value
    return None


@linux_only
def test_a_local_cluster_leaves_this_process_environment_as_it_was(monkeypatch):
    """Dask's nanny copies its pre-spawn variables (OMP_NUM_THREADS=1, ...) into the process
    that starts the cluster; after the job, programs this process starts must not get them."""
    import dask
    import distributed  # noqa: F401 - Dask's defaults

    names = [*dask.config.get("distributed.nanny.pre-spawn-environ"), "GLIBC_TUNABLES", "PYTHONHASHSEED"]
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own value stays
    with connect(ONE_WORKER) as client:
        assert set(client.run(_started_with, "OMP_NUM_THREADS").values()) == {"3"}
        assert set(client.run(_started_with, "MKL_NUM_THREADS").values()) == {"1"}  # Dask's
        assert set(client.run(_started_with, "PYTHONHASHSEED").values()) != {None}  # the nanny's
        assert set(client.run(_started_with, "GLIBC_TUNABLES").values()) == {None}  # none of jacrun's
        os.environ["OPENBLAS_NUM_THREADS"] = "4"  # the caller's own, set inside: kept
    expected = {name: None for name in names} | {"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "4"}
    assert {name: os.environ.get(name) for name in names} == expected


def test_jobqueue_refuses_more_processes_than_cores(tmp_path):
    raw = job_config(cluster={"kind": "slurm", "cores": 2, "processes": 4})
    with pytest.raises(ConfigError, match="processes \\(4\\) cannot exceed cores \\(2\\)"):
        jacrun.load_config(write_config(tmp_path, raw))


def test_blas_threads_never_oversubscribe(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert blas_threads(LocalClusterConfig(workers=2, threads_per_worker=1)) == 4
    assert blas_threads(LocalClusterConfig(workers=2, threads_per_worker=2)) == 2
    assert blas_threads(LocalClusterConfig(workers=16, threads_per_worker=1)) == 1
    assert blas_threads(JobqueueClusterConfig(kind="slurm", cores=4, processes=2)) == 1


def test_a_batch_system_that_is_not_here_is_refused_before_any_store(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no qsub
    path = write_config(tmp_path, job_config(cluster={"kind": "slurm", "cores": 2}))
    with pytest.raises(
        ConfigError, match=r"job.yaml:\d+: cluster.kind: slurm submits worker jobs with `sbatch`"
    ):
        jacrun.submit(jacrun.load_config(path), progress=False)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("walltime", "seconds", "lifetime", "stagger"),
    [
        ("00:01:00", 60, 37, 3),  # the shortest walltime SLURM has: a whole minute
        ("0:30", 60, 37, 3),  # MM:SS, rounded up to a minute as SLURM does
        ("30:00", 1800, 1530, 90),  # MM:SS
        ("01:00:00", 3600, 3060, 180),
        ("04:00:00", 14400, 13500, 300),  # the reserve stops growing at 10 min, the stagger at 5
        ("1-00:00:00", 86400, 85500, 300),
        ("2-12", 216000, 215100, 300),  # D-HH
    ],
)
def test_workers_retire_before_the_walltime(walltime, seconds, lifetime, stagger):
    from jacrun.slurm import walltime_seconds, worker_lifetime

    assert walltime_seconds(walltime) == seconds
    assert worker_lifetime(walltime) == (lifetime, stagger)
    assert lifetime + stagger <= seconds - min(max(seconds // 10, 20), 600)


def test_a_slurm_job_script_names_workers_after_their_batch_job_and_retires_them():
    from jacrun.cluster import job_script

    config = JobqueueClusterConfig(kind="slurm", cores=2, processes=2, walltime="01:00:00")
    script = job_script(config, "tcp://10.0.0.1:8786")
    command = script.splitlines()[-1]
    assert "tcp://10.0.0.1:8786 --name jacrun-${SLURM_JOB_ID} " in command, script
    assert command.endswith("--lifetime 3060s --lifetime-stagger 180s"), script
    assert "#SBATCH -t 01:00:00" in script and "--nworkers 2" in command


@pytest.mark.parametrize(
    ("setting", "reason", "expected"),
    [
        (
            {"memory": "64GiB"},
            "Requested node configuration is not available",
            "cluster.memory: SLURM refuses 64GiB per batch job",
        ),
        (
            {"cores": 32},
            "Requested node configuration is not available",
            "cluster.cores: SLURM refuses 32 cores per batch job",
        ),
        (
            {"queue": "gpu"},
            "Invalid partition name specified",
            "cluster.queue: SLURM refuses partition 'gpu'",
        ),
        (
            {},
            "No partition specified or system default partition",
            "cluster.queue: SLURM has no default partition",
        ),
        (
            {"account": "x"},
            "Invalid account or account/partition combination specified",
            "cluster.account: SLURM refuses account 'x'",
        ),
        ({}, "Invalid qos specification", "cluster: SLURM refuses the batch job"),
        (
            {"job_extra_directives": ["--qos=x"]},
            "Invalid qos specification",
            "cluster.job_extra_directives: SLURM refuses",
        ),
        (
            {},
            "Unable to contact slurm controller (connect failure)",
            "cluster.kind: slurm: sbatch cannot submit from here",
        ),
    ],
)
def test_a_slurm_refusal_names_the_key_at_fault(setting, reason, expected):
    """SLURM's "node configuration is not available" is cores or memory: the partition's limits say which."""
    from jacrun.slurm import Partition, refusal

    limits = Partition("debug", "1:00:00", max_cpus=16, max_memory_mib=32768)
    line = refusal(JobqueueClusterConfig(kind="slurm", **setting), reason, limits)
    assert line.startswith(expected) and f'"{reason}"' in line and "\n" not in line, line


def test_a_batch_clusters_dashboard_listens_on_loopback_and_says_how_to_tunnel(tmp_path):
    import socket

    from distributed import Client

    from jacrun.cluster import dashboard_line, dashboard_link

    config = JobqueueClusterConfig(kind="slurm", dashboard="127.0.0.1:0")
    with jobqueue_cluster(config) as cluster, Client(cluster, set_as_default=False) as client:
        server = cluster.scheduler.services["dashboard"]
        hosts = {sock.getsockname()[0] for sock in server._sockets.values()}
        link = dashboard_link(config, client)
    assert hosts == {"127.0.0.1"}
    port = link.split(":")[2].split("/")[0]
    assert link == f"http://127.0.0.1:{port}/status"
    line = dashboard_line(config, link)
    assert line.endswith(f"(from another machine: ssh -L {port}:127.0.0.1:{port} {socket.gethostname()})")
    opened = JobqueueClusterConfig(kind="slurm", dashboard="0.0.0.0:8787")
    assert dashboard_line(opened, "http://10.1.2.3:8787/status") == "Dashboard: http://10.1.2.3:8787/status"
    assert dashboard_line(JobqueueClusterConfig(kind="pbs", dashboard=None), None).startswith(
        "Dashboard: off"
    )


def test_batch_cluster_settings_are_checked(tmp_path):
    config = JobqueueClusterConfig(kind="slurm")
    assert config.dashboard == "127.0.0.1:8787" and config.startup_timeout == 3600
    assert JobqueueClusterConfig(kind="slurm", startup_timeout="30m").startup_timeout == 1800
    assert JobqueueClusterConfig(kind="slurm", startup_timeout=None).startup_timeout is None
    raw = job_config(cluster={"kind": "slurm", "startup_timeout": "soon", "dashboard": "8787"})
    with pytest.raises(ConfigError) as refused:
        jacrun.load_config(write_config(tmp_path, raw))
    assert re.search(
        r"cluster\.startup_timeout: expected a duration like 90s, 30m or 2h, got 'soon'", str(refused.value)
    )
    assert re.search(r"cluster\.dashboard: expected host:port, got '8787'", str(refused.value))
