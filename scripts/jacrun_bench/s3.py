"""Section ``s3``: the end-to-end vjp job into an S3 store (moto's server on 127.0.0.1) against
the same job on local disk.

moto's server keeps every object in memory and runs in this process, on the same 2 cores as
the workers: a stand-in for an object store, not a model of one, so the section has no target.
It needs ``moto[server]`` and s3fs (the ``test`` extra); without them it says so.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from jacrun_bench.common import Context, Target

NAME = "s3"
TITLE = "Results on object storage (moto's S3 server)"
HELP = "skip the job into moto's S3 server"
BUCKET = "bench"


@dataclass
class S3Result:
    samples: int
    result_bytes: int
    seconds: dict[str, float]
    """store kind ("local disk", "S3 (moto)") -> seconds computing the job."""
    identical: bool


def measure(ctx: Context) -> S3Result | str:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        return "Not measured: needs moto[server] and s3fs (pip install 'jacrun[s3]' 'moto[server]')."
    import numpy as np
    import s3fs
    from moto import server as moto_server

    import jacrun
    from jacrun_bench.e2e import e2e_config, local_cluster

    samples = 8 * ctx.shapes.e2e_samples
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    seconds: dict[str, float] = {}
    folder = Path(tempfile.mkdtemp(prefix="jacrun-bench-s3-"))
    try:
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(BUCKET)
        stores = {"local disk": str(folder / "job.zarr"), "S3 (moto)": f"s3://{BUCKET}/job.zarr"}
        with local_cluster() as (address, fresh_workers, _):
            for kind, store in stores.items():
                fresh_workers()
                config = e2e_config(ctx.shapes, samples, Path("unused"), address)
                config["output"] = {**config["output"], "store": store}
                if store.startswith("s3://"):
                    config["output"]["storage_options"] = options
                ctx.log(f"  {samples:,} samples into {kind}")
                start = time.perf_counter()
                summary = jacrun.submit(jacrun.config_from_dict(config), progress=False, overwrite=True)
                seconds[kind] = time.perf_counter() - start
                assert summary.ok, summary.failures
                ctx.log(f"  {seconds[kind]:.1f} s")
        local = jacrun.load(stores["local disk"])
        remote = jacrun.load(stores["S3 (moto)"], storage_options=options)
        identical = bool(np.array_equal(local.vjp.values, remote.vjp.values))
        result_bytes = local.attrs["jacrun"]["plan"]["output_bytes"]
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return S3Result(samples, result_bytes, seconds, identical)


def render(result: S3Result | str, ctx: Context) -> str:
    if isinstance(result, str):
        return result
    lines = [
        f"The end-to-end vjp job ({result.samples:,} samples, {result.result_bytes / 1e9:.2f} GB of "
        "results and outputs, zstd) on the 2-worker local cluster, first into a local store (the "
        "write-behind path), then into `s3://` on moto's server (zarr's FsspecStore, whole-chunk "
        "puts), each on fresh workers. Seconds include the cluster's start-up of the job.",
        "",
        "| store | seconds | MB/s of results | against local disk |",
        "|---|---:|---:|---:|",
    ]
    base = result.seconds["local disk"]
    for kind, seconds in result.seconds.items():
        lines.append(
            f"| {kind} | {seconds:.1f} | {result.result_bytes / 1e6 / seconds:,.0f} | {base / seconds:.0%} |"
        )
    same = "bit-identical" if result.identical else "DIFFERENT"
    lines += ["", f"The two stores' results are {same}."]
    return "\n".join(lines)


def targets(result: S3Result | str | None) -> list[Target]:
    if not isinstance(result, S3Result):
        return []
    return [
        Target(
            "S3 store: results bit-identical to local disk (1 = yes)", float(result.identical), 1.0, "{:.0f}"
        )
    ]
