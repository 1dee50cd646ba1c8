"""Smoke test of the benchmark's sparse section (scripts/jacrun_bench/sparse.py) with JAX, in
process, at L = 8 and one round: asdex's two uses and the adapters' rows, their agreement and
the targets. The shared ``--quick`` run of tests/test_bench.py covers the section without
frameworks (and its bratu job); this checks the benchmark, not the speed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from jacrun_bench import common, report  # noqa: E402
from jacrun_bench import sparse as sparse_section  # noqa: E402


def test_the_sparse_rows_with_jax_report_asdex_both_ways_and_the_adapters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("jax")
    pytest.importorskip("asdex")
    monkeypatch.setattr(common, "PAUSE", 0.0)  # no thread pools to let settle: nothing is measured
    rows = [
        sparse_section.bench_grid(residual, 8, 4, 1, {"jax"}, lambda message: None, min_seconds=0.0)
        for residual in ("bratu", "9-point")
    ]
    bratu, nine = rows
    assert (bratu.colours, bratu.their_colours, nine.colours, nine.their_colours) == (5, 7, 9, 9)
    for row in rows:
        assert {"NumPy Function", "jax adapter", sparse_section.OWN, "asdex loop", "asdex vmap"} <= set(
            row.rates
        )
        assert max(row.errors.values()) <= 1e-15 and set(row.fused_errors) == {"jax adapter"}
        assert row.fused_errors["jax adapter"] <= 1e-15
        assert row.best_jax() is not None and row.best_asdex() == max(
            row.rates["asdex loop"], row.rates["asdex vmap"]
        )
    assert "built-in" in bratu.rates and bratu.fill_bytes_per_second and bratu.memory_bytes_per_second
    table = sparse_section.table(rows[1:])
    assert "jax adapter, own arrays / best asdex" in table and "| 8 | 64 | 484 | 9 / 9 |" in table
    result = sparse_section.SparseResult(rows, [], 1, 4)
    verdicts = {cells[0]: cells[1:] for cells in _rows(report.targets_table(sparse_section.targets(result)))}
    assert "9-point L=8: jax adapter (its better use) >= 1.0x the better asdex" in verdicts
    assert verdicts["fused nonzeros agree with the general path (max relative error)"][1] == "yes"
    assert verdicts["bratu L=8: colours no more than asdex's (asdex - jacrun)"] == ["+2", "yes"]


def _rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()[2:]]


def test_the_colourings_table_reports_colours_against_asdex_and_the_optimum() -> None:
    """The quick patterns: every stencil at its optimum, never more colours than asdex."""
    pytest.importorskip("asdex")
    from jacrun_bench import colourings

    rows = colourings.measure(quick=True)
    stencils = [row for row in rows if row.optimal]
    assert [row.colours for row in stencils] == [5, 9, 7, 27]
    assert all(row.colours == row.lower_bound and row.method.startswith("lattice") for row in stencils)
    assert all(row.their_colours is not None and row.colours <= row.their_colours for row in rows)
    table = colourings.table(rows)
    assert "| 7-point 6 x 6 x 6 | 216 | 7 | 7 |" in table
    result = sparse_section.SparseResult([], [], 1, 4, rows)
    targets = {t.what: t for t in sparse_section.targets(result)}
    assert targets["7-point 6 x 6 x 6: colours / optimum"].value == 1.0
    assert "**no**" not in "\n".join(t.row() for t in targets.values())
