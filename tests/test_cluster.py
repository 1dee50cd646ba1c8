"""Cluster kinds: TLS to a real scheduler, SLURM/PBS job scripts, BLAS threads, warnings."""

from __future__ import annotations

import datetime
import ipaddress
import os
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
