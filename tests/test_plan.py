"""The planner: tables of expected plans, pure arithmetic, refusals before anything runs."""

from __future__ import annotations

import pytest

from jacrun.plan import PlanError, block_memory, make_plan

MiB = 2**20


def plan(**overrides):
    args = dict(
        mode="vjp",
        samples=10_000,
        n_in=64,
        n_out=10,
        vectors=4,
        vector_dim=True,
        shared_vectors=False,
        strategy=None,
        compute_itemsize=8,
        output_itemsize=4,
        save_outputs=True,
        chunk_samples="auto",
        chunk_vectors="auto",
        task_memory=256 * MiB,
        worker_memory=4 * 2**30,
        workers=2,
        work_bytes=lambda rows, k: 0,
        flops=lambda rows, k: 10.0 * rows * k,
    )
    args.update(overrides)
    return make_plan(**args)


@pytest.mark.parametrize(
    ("overrides", "block", "grid", "result_shape", "result_chunks", "dims"),
    [
        (
            {"chunk_samples": 1000},
            (1000, 4),
            (10, 1),
            (10_000, 4, 64),
            (1000, 4, 64),
            ("sample", "vector", "input"),
        ),
        (
            {"chunk_samples": 3000, "chunk_vectors": 3},
            (3000, 3),
            (4, 2),
            (10_000, 4, 64),
            (3000, 3, 64),
            None,
        ),
        ({"chunk_samples": 20_000}, (10_000, 4), (1, 1), None, None, None),
        (
            {"mode": "jvp", "chunk_samples": 500},
            (500, 4),
            (20, 1),
            (10_000, 4, 10),
            (500, 4, 10),
            ("sample", "vector", "output"),
        ),
        (
            {"vectors": 1, "vector_dim": False, "chunk_samples": 500},
            (500, 1),
            (20, 1),
            (10_000, 64),
            (500, 64),
            ("sample", "input"),
        ),
        (
            {"mode": "jacobian", "strategy": "rev", "vectors": 10, "chunk_samples": 100, "chunk_vectors": 5},
            (100, 5),
            (100, 2),
            (10_000, 10, 64),
            (100, 5, 64),
            ("sample", "output", "input"),
        ),
        (
            {"mode": "jacobian", "strategy": "fwd", "vectors": 64, "chunk_samples": 100, "chunk_vectors": 16},
            (100, 16),
            (100, 4),
            (10_000, 10, 64),
            (100, 10, 16),
            ("sample", "output", "input"),
        ),
    ],
)
def test_expected_plans(overrides, block, grid, result_shape, result_chunks, dims):
    p = plan(**overrides)
    assert (p.samples_per_block, p.vectors_per_block) == block
    assert p.grid == grid and p.n_blocks == grid[0] * grid[1]
    if result_shape:
        assert p.result_shape == result_shape and p.result_chunks == result_chunks
    if dims:
        assert p.result_dims == dims
    assert p.flops_per_block == 10.0 * block[0] * block[1]


def test_last_blocks_are_ragged():
    p = plan(chunk_samples=3000, chunk_vectors=3)
    assert p.block_rows(3) == (9000, 10_000) and p.block_vectors(1) == (3, 4)


def test_auto_fits_the_budget_and_balances_workers():
    p = plan(samples=1_000_000, task_memory=8 * MiB, work_bytes=lambda rows, k: rows * k * 1000)
    assert p.memory_per_block <= 8 * MiB
    assert p.vectors_per_block == 4
    a, b = p.block_rows(p.grid[0] - 1)
    assert b - a >= p.samples_per_block - p.grid[0]  # blocks of equal size: no ragged sliver
    small = plan(samples=10_000)
    assert small.n_blocks >= 2 * 2  # at least a few blocks per worker when rows allow


def test_auto_splits_vectors_when_rows_would_be_too_few():
    p = plan(vectors=4096, task_memory=64 * MiB, work_bytes=lambda rows, k: rows * k * 512)
    assert p.vectors_per_block < 4096 and p.memory_per_block <= 64 * MiB
    assert p.samples_per_block >= 256


def test_memory_grows_with_rows_vectors_and_shared_vectors_cost_less():
    kw = dict(
        mode="vjp",
        n_in=64,
        n_out=10,
        strategy=None,
        compute_itemsize=8,
        output_itemsize=8,
        save_outputs=True,
        work_bytes=lambda r, k: 0,
    )
    per_sample = block_memory(100, 4, shared_vectors=False, **kw)
    assert block_memory(200, 4, shared_vectors=False, **kw) > per_sample
    assert block_memory(100, 8, shared_vectors=False, **kw) > per_sample
    assert block_memory(100, 4, shared_vectors=True, **kw) < per_sample


def test_too_small_budget_is_refused():
    with pytest.raises(PlanError, match="chunks.task_memory: .* is too small"):
        plan(task_memory=1000, work_bytes=lambda rows, k: rows * 10_000)


def test_block_over_worker_memory_is_refused():
    with pytest.raises(PlanError, match="memory limit"):
        plan(chunk_samples=10_000, worker_memory=1 * MiB)


def test_explicit_block_over_budget_warns():
    p = plan(chunk_samples=10_000, task_memory=1 * MiB)
    assert p.warnings and "over chunks.task_memory" in p.warnings[0]


def test_plan_to_dict_is_json():
    import json

    data = json.loads(json.dumps(plan(chunk_samples=1000).to_dict()))
    assert data["grid"] == [10, 1] and data["result_dims"] == ["sample", "vector", "input"]


def test_timed_auto_blocks_aim_for_about_a_second():
    common = dict(task_memory=2**30, worker_memory=None, work_bytes=lambda rows, k: 0)
    big = plan(samples=1_000_000, seconds_per_row=lambda k, most: 1e-4, **common)
    assert 0.2 <= big.seconds_per_block <= 1.0 and big.n_blocks == 100
    assert big.estimated_seconds == pytest.approx(50 * big.seconds_per_block)
    small = plan(samples=10_000, seconds_per_row=lambda k, most: 1e-5, **common)
    assert small.n_blocks == 1  # 0.1 s of work: one block, not many tiny ones
    untimed = plan(samples=10_000, **common)
    assert untimed.seconds_per_block is None and untimed.n_blocks > 1
    explicit = plan(samples=10_000, chunk_samples=1000, seconds_per_row=lambda k, most: 1e-4, **common)
    assert explicit.n_blocks == 10 and explicit.seconds_per_block == pytest.approx(0.1)  # estimate only


def test_the_runtime_estimate_times_inputs_kernel_and_encoding(tmp_path, monkeypatch):
    """block_timer adds the reading of x and the vectors and the in-memory encoding of the
    results (with the job's codec) to the kernel's time."""
    import numpy as np

    import jacrun.store
    from jacrun.config import config_from_dict
    from jacrun.prepare import block_timer, prepare
    from tests.helpers import job_config

    assert jacrun.store.encode_seconds([np.zeros((0, 3))], "zstd", "float32") == 0.0
    assert jacrun.store.encode_seconds([np.ones((100, 5)), np.ones((100, 2))], "zstd", "float32") > 0
    job = prepare(config_from_dict(job_config(str(tmp_path / "o.zarr"))), calibrate=False)
    encoded = []

    def encode(arrays, compression, dtype):
        encoded.append(([a.shape for a in arrays], compression, dtype))
        return 1.0

    monkeypatch.setattr(jacrun.store, "encode_seconds", encode)
    timer = block_timer(job.function, job.inputs, job.vectors, True, 1, job.config.output)
    per_row = timer(3, 1000)
    rows = job.inputs.shape[0]  # 100 rows: the kernel is fast, so every row is timed
    assert per_row >= 1.0 / rows
    assert encoded == [([(rows, 3, 5), (rows, 3)], "zstd", "float64")]
    assert timer(3, 20) >= 1.0 / 20 and encoded[-1][0] == [(20, 3, 5), (20, 3)]  # a block's rows at most
    without = block_timer(job.function, job.inputs, job.vectors, True, 1)(3, 1000)
    assert without < 1.0 / rows and len(encoded) == 2


def test_jacrun_plan_times_no_more_rows_than_a_block_holds(tmp_path):
    """The runtime estimate's calibration calls the kernel on at most a block's rows: a larger
    call costs more per row (fresh pages, arrays beyond the caches) and overestimated the
    bratu L = 256 job 1.75x."""
    from tests.helpers import REPO, job_config, run_cli, write_config

    record = tmp_path / "batches.txt"
    function = {
        "kind": "python",
        "target": "tests.plugins:BatchRecorder",
        "path": str(REPO),
        "params": {"record": str(record)},
    }
    config = write_config(
        tmp_path,
        job_config(function=function, inputs={"kind": "random", "samples": 400}, chunks={"samples": 12}),
    )
    result = run_cli("plan", str(config))
    assert result.returncode == 0, result.stderr
    assert "estimated runtime" in result.stdout
    batches = [int(line) for line in record.read_text().split()]
    assert batches and max(batches) == 12, batches  # the fast kernel is timed on a whole block
