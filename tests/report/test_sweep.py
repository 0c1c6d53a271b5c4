"""report/sweep.py: the "PTQ vs QAT by bits" table and its sentences, read off a results dict
(the section as markdown and HTML render it is tested in tests/report/test_render.py)."""

from __future__ import annotations

from typing import Any

from toys import result_row  # tests/toys.py

from edgequant.report.sweep import fmt, same_graph_speed, sweep


def sweep_results(test_split: bool) -> dict[str, Any]:
    """FP32 0.95; static PTQ and QAT at W8A8 (both within 0.01) and W2A2 (PTQ 0.70, QAT 0.90,
    epoch 3 kept); with test_split, every metric also on a test split 0.01 lower."""
    runs = [
        result_row("ptq-static-w8a8", "ptq", "static", 8, 8, 0.947, 33_000, 0.05, 0.9),
        result_row("qat-w8a8", "qat", "static", 8, 8, 0.948, 33_000, 0.05, 0.9),
        result_row("ptq-static-w2a2", "ptq", "static", 2, 2, 0.70, 15_000, 0.06, 1.0),
        result_row("qat-w2a2", "qat", "static", 2, 2, 0.90, 15_000, 0.06, 1.0, kept_epoch=3),
    ]
    baseline: dict[str, Any] = {"metric": 0.95, "size_bytes": 120_000}
    if test_split:
        baseline["metric_test"] = 0.94
        for run in runs:
            run["metric_test"] = run["metric_deployed"] - 0.01
    return {"metric": "accuracy", "tolerance": 0.01, "baseline": baseline, "runs": runs}


def test_sweep_judges_the_gap_on_the_test_split_and_names_where_ptq_stops() -> None:
    header, rows, summary = sweep(sweep_results(test_split=True)) or ([], [], "")
    assert header == [
        "bits",
        "PTQ (seen)",
        "QAT (seen)",
        "PTQ (test)",
        "QAT (test)",
        "PTQ gap to FP32 (test, pts)",
        "recovered by QAT",
        "QAT epoch kept",
    ]
    assert ["W2A2", "0.7000", "0.9000", "0.6900", "0.8900", "25.0", "80 %", "3"] in rows
    assert ["W8A8", "0.9470", "0.9480", "0.9370", "0.9380", "0.3", "-", "-"] in rows
    assert summary == (
        "PTQ holds within 0.01 of FP32 down to W8A8; at W2A2 it falls 25.0 points below FP32 on "
        "the data the recommendation saw. On the test split, which nothing was chosen on: W2A2 "
        "PTQ 25.0 points below FP32, QAT recovers 20.0 (80 % of the gap)."
    )


def test_sweep_without_a_test_split_or_a_gap() -> None:
    data = sweep_results(test_split=False)
    header, rows, summary = sweep(data) or ([], [], "")
    assert "PTQ (test)" not in header and "PTQ gap to FP32 (deployed, pts)" in header
    assert "On the same data: W2A2 PTQ 25.0 points below FP32" in summary
    data["runs"] = data["runs"][:2]
    assert "QAT is not needed here" in (sweep(data) or ([], [], ""))[2]
    data["runs"] = data["runs"][:1]  # PTQ alone: no bit width has both
    assert sweep(data) is None
    assert same_graph_speed(data) is None
    assert fmt(None) == "-" and fmt(0.5) == "0.5000" and fmt(2.0, ".1f") == "2.0"
