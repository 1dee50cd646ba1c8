"""Smoke test of the benchmark's ``fd`` section (scripts/jacrun_bench/fd.py) with ``--quick``
shapes, in process: its rows, its agreement with SciPy and its targets. It checks the benchmark,
not the speed (``--quick`` measures nothing); the job runs in full runs only."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from jacrun_bench import common, report  # noqa: E402
from jacrun_bench import fd as fd_section  # noqa: E402

from tests.helpers import table_rows  # noqa: E402


def test_the_fd_section_reports_scipy_the_methods_and_its_targets() -> None:
    ctx = common.Context(common.QUICK, quick=True, log=lambda message: None)
    result = fd_section.measure(ctx)
    text = fd_section.render(result, ctx)
    rows = [row for row in table_rows(text, "") if row[0] in ("9-point stencil L=8", "banded chain")]
    assert [row[3] for row in rows] == ["9 / 13", "4 / 6"]  # colours: jacrun / SciPy's groups
    assert all(row[-1] == "0.0e+00" for row in rows)  # SciPy's steps: the same Jacobians, bit for bit
    errors = {row[1]: float(row[3]) for row in table_rows(text, "9-point stencil, n = 64")}
    assert errors["forward"] < 1e-6 and errors["central"] < 1e-8 and errors["complex"] < 1e-13
    assert "The job runs in full runs only" in text
    verdicts = {
        cells[0]: cells[1:] for cells in table_rows(report.targets_table(fd_section.targets(result)), "fd ")
    }
    assert verdicts["fd colours no more than SciPy's groups (SciPy - jacrun, fewest)"] == ["+2", "yes"]
    assert (
        verdicts["fd job of 10,000 at n=4,096: >= 3x SciPy's loop, cluster start included"][0]
        == "not measured"
    )
    assert verdicts["fd complex: error against the exact Jacobian below 1e-13"][1] == "yes"
