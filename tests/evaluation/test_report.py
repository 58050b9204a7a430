"""The report of a comparison: records, tables, JSON / CSV files, selection."""

from __future__ import annotations

import csv
import json
import math

import pytest

from ekfac_laplace.evaluation.report import (
    Comparison,
    ComparisonRow,
    format_cell,
    select,
)


def _rows() -> list[ComparisonRow]:
    ok = ComparisonRow(
        "all_ekfac",
        "all",
        "ekfac",
        "ggn",
        n_params=10,
        fit_seconds=0.25,
        prior_precision=[0.5, 2.0],
        log_marginal_likelihood=-12.5,
        val={"nll": 0.4},
        test={"accuracy": 0.9, "nll": math.inf, "ood_auroc_entropy": 0.8},
        shift={"noise": {0.5: {"nll": 1.0}, 1.0: {"nll": 2.0}}},
    )
    failed = ComparisonRow(
        "all_full", "all", "full", "ggn", status="failed", error="MemoryError: no"
    )
    return [ok, failed]


def test_record_flattens_metrics_and_summarises_the_prior():
    record = _rows()[0].record()
    assert record["prior_precision"] == pytest.approx(1.0)  # geometric mean
    assert record["val_nll"] == 0.4 and record["test_accuracy"] == 0.9
    assert record["ood_auroc_entropy"] == 0.8  # OOD keys keep their prefix
    assert record["shift_noise_nll"] == pytest.approx(1.5)
    assert record["shift_noise_0.5_nll"] == 1.0


def test_table_json_and_csv(tmp_path):
    comparison = Comparison(rows=_rows(), config={"likelihood": "classification"})
    table = comparison.table()
    assert table.splitlines()[0].startswith("candidate")
    assert "MemoryError: no" in table  # failed rows show their error
    assert comparison.table(markdown=True).startswith("| candidate |")
    payload = json.loads(comparison.to_json(tmp_path / "r.json").read_text())
    assert payload["config"] == {"likelihood": "classification"}
    assert payload["records"][0]["test_nll"] is None  # non-finite becomes null
    assert payload["rows"][0]["shift"]["noise"]["0.5"] == {"nll": 1.0}
    with comparison.to_csv(tmp_path / "r.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["candidate"] for r in rows] == ["all_ekfac", "all_full"]
    assert rows[1]["status"] == "failed" and "test_accuracy" in rows[1]
    assert comparison.row("all_full").error == "MemoryError: no"
    with pytest.raises(KeyError, match="No candidate 'x'"):
        comparison.row("x")


def test_cells_are_short_and_readable():
    assert format_cell(None) == "-"
    assert format_cell(0.123456) == "0.1235"
    assert format_cell(123.456) == "123.5"
    assert format_cell(1.5e-5) == "1.5e-05"
    assert format_cell(math.inf) == "inf"


def test_select_by_evidence_and_validation_nll():
    rows = [
        ComparisonRow("map", None, None, None, val={"nll": 0.50}),
        ComparisonRow(
            "ll_kron", "last_layer", "kron", "ggn", log_marginal_likelihood=-120.0
        ),
        ComparisonRow(
            "all_ekfac",
            "all",
            "ekfac",
            "ggn",
            log_marginal_likelihood=-100.0,
            val={"nll": 0.30},
        ),
        ComparisonRow(
            "all_kron",
            "all",
            "kron",
            "ggn",
            status="failed",
            error="MemoryError",
            log_marginal_likelihood=10.0,
        ),
    ]
    evidence = select(rows, "evidence")
    assert evidence.candidate == "all_ekfac" and evidence.value == -100.0
    assert "runner-up ll_kron" in evidence.reason and "margin 20" in evidence.reason
    assert "different weights as random" in evidence.reason
    validation = select(rows, by="val_nll")
    assert validation.candidate == "all_ekfac" and "runner-up map" in validation.reason
    with pytest.raises(ValueError, match="Unknown selection criterion"):
        select(rows, by="test_nll")
    with pytest.raises(ValueError, match="needs a Laplace candidate"):
        select(rows[:1], by="evidence")


def test_shift_means_average_each_kind_over_its_strengths_then_the_kinds():
    row = ComparisonRow(
        "all_ekfac",
        "all",
        "ekfac",
        "ggn",
        shift={
            "rotation": {
                15.0: {"nll": 1.0, "ece": 0.1},
                30.0: {"nll": 3.0, "ece": 0.3},
            },
            "noise": {0.1: {"nll": 4.0}},
        },
    )
    # nll: (2 + 4) / 2; ece: only rotation has it, (0.1 + 0.3) / 2
    assert row.shift_means() == pytest.approx({"shift_nll": 3.0, "shift_ece": 0.2})
    record = row.record()
    assert record["shift_rotation_nll"] == 2.0 and record["shift_noise_nll"] == 4.0
    assert ComparisonRow("map", None, None, None).shift_means() == {}
