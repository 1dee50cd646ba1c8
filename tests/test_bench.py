"""Smoke tests of the benchmark (scripts/bench.py, the package scripts/jacrun_bench): it runs in
seconds and its report has the expected rows, cells and verdicts. They check the benchmark, not
the speed (``--quick`` shapes measure nothing)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench.py"
sys.path.insert(0, str(SCRIPT.parent))

from jacrun_bench import common, kernels, memory  # noqa: E402
from jacrun_bench import e2e as end_to_end  # noqa: E402
from jacrun_bench import report as bench_report  # noqa: E402
from jacrun_bench.sections import SECTIONS, sections  # noqa: E402

from jacrun.block import STEPS  # noqa: E402
from tests.helpers import table_rows  # noqa: E402

KERNEL_ROWS = {
    (f"mlp {mode}", dtype) for mode in ("vjp", "jvp", "jacobian") for dtype in ("float32", "float64")
}
KERNEL_ROWS |= {("lorenz96 vjp", "float64"), ("lorenz96 vjp", "float32")}


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """``scripts/bench.py`` with ``args`` in a subprocess; it must succeed."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One ``--quick`` run of every section but the end-to-end ones (the e2e test runs those on
    the test cluster), the adapters (tests/test_adapters.py) and fd (tests/test_bench_fd.py):
    kernels without frameworks, sparse, reduce and s3. Its report is also written to ``--output``."""
    out = tmp_path_factory.mktemp("bench") / "bench.md"
    done = run_bench(
        "--quick", "--skip-e2e", "--skip-adapters", "--skip-fd", "--frameworks", "none", "--output", str(out)
    )
    report = out.read_text()
    assert report.strip() == done.stdout.strip()
    return report


def test_quick_run_reports_every_kernel(quick_report: str) -> None:
    """Without frameworks: every kernel row, the BLAS, the skips."""
    report = quick_report
    rows = table_rows(report, "mlp ") + table_rows(report, "lorenz96 ")
    kernels = [(cells[0], cells[1]) for cells in rows if len(cells) == 10]
    assert sorted(kernels) == sorted(KERNEL_ROWS)
    for cells in rows:
        if len(cells) != 10:
            continue
        assert cells[3].endswith(" ms") and float(cells[3].split()[0].replace(",", "")) > 0
        assert "/s" in cells[4]
        assert cells[7:] == ["skipped", "skipped", "skipped"]
        if cells[0].startswith("mlp"):
            assert "% of " in cells[6]
    assert "BLAS in use: **" in report and "threadpool_info" in report
    targets = {cells[0] for cells in table_rows(report, "mlp vjp float")}
    assert "mlp vjp float32 >= 90% of GEMM peak" in targets
    assert "mlp vjp float64 >= 1.2x torch.func.vjp" in targets


def test_a_skipped_section_reports_nothing_but_its_skip(quick_report: str) -> None:
    for name in ("e2e", "adapters", "fd"):  # fd: tests/test_bench_fd.py
        assert f"Skipped (--skip-{name})." in quick_report
    assert "| total |" not in quick_report and not table_rows(quick_report, "8N")  # no e2e rows


def test_framework_cells_and_targets() -> None:
    """Ratios are framework time / jacrun time; targets compare them with the issue's goals."""
    row = kernels.Row(
        kernel="mlp vjp",
        dtype="float32",
        shape="s",
        seconds=0.1,
        unit="VJPs",
        count=1000,
        flops=18e9,
        peak=200e9,
        frameworks={
            "torch": ("torch.func.vjp", 0.15, 1e-6),
            "jax": ("jax jit(vjp)", 0.105, 0.5),
            "autograd": "not installed",
        },
    )
    table = kernels.kernel_table([row])
    assert "**1.50x** (torch.func.vjp 150 ms)" in table
    assert "MISMATCH" in table and "not installed" in table
    assert "90% of 200" in table
    verdicts = {
        cells[0]: cells[2]
        for cells in table_rows(bench_report.targets_table(kernels.targets([row])), "mlp vjp")
    }
    assert verdicts["mlp vjp float32 >= 90% of GEMM peak"] == "yes"
    assert verdicts["mlp vjp float32 >= 1.2x torch.func.vjp"] == "yes"
    assert verdicts["mlp vjp float32 >= 1.1x jax jit(vjp)"] == "**no**"


def test_end_to_end_on_a_cluster(scheduler_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-to-end part on the test cluster: two small jobs, memory sampled, a table."""
    from distributed import Client

    shapes = dataclasses.replace(common.QUICK, e2e_samples=600, e2e_block=300, e2e_sizes=(8, 16, 4), reps=1)
    with Client(scheduler_address, set_as_default=False) as client:
        pids = list(client.run(os.getpid).values())
    inside: list[bool] = []  # whether the cluster is "running": no kernel baseline beside it
    kernels: list[tuple[str, bool]] = []
    measure = end_to_end.in_process_rate

    def recorded(*args, **kwargs):
        kernels.append((args[3] if len(args) > 3 else kwargs.get("mode", "vjp"), bool(inside)))
        return measure(*args, **kwargs)

    @contextlib.contextmanager
    def test_cluster():  # the session's cluster, "started" for the jobs only
        inside.append(True)
        yield scheduler_address, lambda: pids, 0.0
        inside.clear()

    monkeypatch.setattr(end_to_end, "in_process_rate", recorded)
    e2e = end_to_end.measure_e2e(shapes, test_cluster, lambda message: None)
    assert sorted(kernels) == [("jacobian", False)] * 2 + [("vjp", False)] * 3
    assert e2e.small.ok and e2e.large.ok
    assert (e2e.small.blocks, e2e.large.blocks) == (2, 16)
    assert e2e.large.result_bytes == 4800 * (8 + 4) * 4
    assert e2e.small.peak_rss >= e2e.small.idle_rss > 0 and e2e.large.projected > 0
    assert e2e.kernel_rate > 0 and e2e.ratio > 0
    assert len(e2e.kernel_rates) == 3 and e2e.kernel_rate == sorted(e2e.kernel_rates)[1]  # the median
    assert set(e2e.steps) == set(STEPS) and {"kernel", "write"} <= set(STEPS)  # run_block's own steps
    assert all(seconds > 0 for seconds in e2e.steps.values())
    assert set(e2e.codecs) == {"zstd", "blosc", "none"}
    assert all(seconds > 0 and 0 < ratio < 1.2 for seconds, ratio in e2e.codecs.values())
    assert 1.0 < e2e.codecs["none"][1] < 1.001  # uncompressed chunks: the raw bytes and a 4-byte CRC32C
    table = end_to_end.e2e_table(e2e, shapes)
    assert "| total |" in table and "median of 3 measurements with no cluster running" in table
    assert [len(table_rows(table, name)) for name in ("zstd", "blosc", "none")] == [1, 1, 1]
    assert len(table_rows(table, "N")) == 1 and len(table_rows(table, "8N")) == 3
    assert e2e.large.block_seconds["kernel"] > 0  # the workers' own split, from the store
    assert e2e.large.cpu["workers"] > 0 and e2e.large.cpu["this process"] > 0
    assert sum(e2e.large.cpu.values()) <= (e2e.large.seconds + 0.5) * (os.cpu_count() or 1)  # this job's only
    assert "CPU during the 8N job: the workers used" in table
    assert "as the workers measured it" in table and len(table_rows(table, "kernel")) == 2
    assert e2e.uncompressed is not None and e2e.uncompressed.ok
    assert e2e.blosc is not None and e2e.blosc.ok
    assert e2e.jacobian is not None and e2e.jacobian.ok and e2e.jacobian_kernel_rate > 0
    assert len(e2e.jacobian_kernel_rates) == 2  # before and after the jobs
    assert e2e.jacobian.result_bytes == shapes.e2e_jacobian_samples * (4 * 8 + 4) * 4  # J and y
    (jacobian,) = table_rows(table, "per-sample Jacobians")
    assert jacobian[1] == f"{shapes.e2e_jacobian_samples:,}"
    workers = memory.render(e2e, common.Context(shapes))
    assert len(table_rows(workers, "N, ")) == 1 and len(table_rows(workers, "8N")) == 3
    assert "Peak worker memory above idle at 8N vs N" in workers
    targets = bench_report.targets_table(end_to_end.targets(e2e) + memory.targets(e2e))
    verdicts = table_rows(targets, "end to end") + table_rows(targets, "peak")
    assert len(verdicts) == 10 and all(v[1] != "not measured" for v in verdicts)


def test_huge_pages_are_off_in_the_bench_and_default_for_its_workers(tmp_path: Path) -> None:
    """The bench process turns NumPy's huge pages off for itself, but leaves no variable behind
    for the worker processes it spawns (they keep NumPy's default, as a user's workers do)."""
    probe = (
        "import os, runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "from numpy._core.multiarray import _get_madvise_hugepage\n"
        "print(_get_madvise_hugepage(), os.environ.get('NUMPY_MADVISE_HUGEPAGE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["False", "None"]


def test_sparse_reduce_and_s3_sections(quick_report: str) -> None:
    """The sparse section (two residuals in process, the fill bandwidth, the bratu job killed
    and resumed), the reduce section (the active-subspace job at N and 8N, 1 and 2 workers) and
    the s3 section (a job into moto's server against local disk) run and report their rows."""
    report = quick_report
    eights = [row for row in table_rows(report, "8") if row[0] == "8"]
    grids = [row for row in eights if " / " in row[3]]  # L, n, nonzeros, colours (jacrun / asdex), ...
    assert [row[:4] for row in grids] == [["8", "64", "288", "5 / -"], ["8", "64", "484", "9 / -"]]
    assert grids[0][-1] == "0.0e+00"  # bratu's own nonzeros: the products path's bits (no framework)
    assert grids[1][-1] == "-"  # the 9-point residual's only contender without frameworks: its NumPy class
    (fill,) = [row for row in eights if row[2].endswith(" GB/s")]
    assert fill[2].endswith(" GB/s") and fill[4].endswith("%") and fill[6].endswith("%")
    job = next(row for row in table_rows(report, "bratu") if len(row) == 12)
    assert "(complete)" in job[-1] and "values within" in job[-1]
    assert [row[:2] for row in table_rows(report, "") if row[0] in ("10,000", "80,000")] == [
        ["10,000", "4"],
        ["80,000", "32"],
    ]
    assert "The Gram from 1 worker and from 2 workers: identical to the last bit." in report
    assert "| active subspace: Gram from 1 and 2 workers bit-identical | 1 | yes |" in report
    assert "| values agree with dense Jacobians (max relative error) |" in report
    assert "The two stores' results are bit-identical." in report  # the s3 section, on moto


def test_every_registered_section_plugs_in() -> None:
    """A section is a module named in SECTIONS with its name, title, flag help and three functions."""
    for name, section in zip(SECTIONS, sections(), strict=True):
        assert name == section.NAME and section.TITLE and section.HELP
        assert all(callable(getattr(section, part)) for part in ("measure", "render", "targets"))
    assert SECTIONS[:2] == ("kernels", "e2e") and SECTIONS.index("memory") > SECTIONS.index("e2e")
