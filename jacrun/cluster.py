"""The only code that starts or connects to Dask clusters."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from jacrun.config import AddressClusterConfig, LocalClusterConfig


@contextlib.contextmanager
def connect(
    config: LocalClusterConfig | AddressClusterConfig, scheduler: str | None = None
) -> Iterator:
    """Yield a ``distributed.Client``: to ``scheduler`` if given, else as the config says.

    Local clusters listen on 127.0.0.1 only (scheduler, workers and dashboard).
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        config = AddressClusterConfig(kind="address", address=scheduler)
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
        with Client(config.address, security=security, timeout="30s") as client:
            yield client
        return
    dashboard = config.dashboard if config.dashboard is not None else None
    with (
        LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            memory_limit=int(config.memory_limit),
            host="127.0.0.1",
            dashboard_address=dashboard if dashboard is not None else ":0",
            processes=True,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
