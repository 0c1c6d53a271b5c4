"""A lower-is-better metric (perplexity) through the report: the tolerance rule
(report/direction.py), the Pareto front, the crossover, the PTQ-vs-QAT table for weight-only
runs and the tolerance band in the plot, each read from results["lower_is_better"]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from toys import result_row  # tests/toys.py

from edgequant.report import plots
from edgequant.report.direction import gap_to_fp32, limit, tolerance_rule, within
from edgequant.report.plots import bit_sweep, crossover, pareto_front
from edgequant.report.render import markdown
from edgequant.report.sweep import sweep


def lm_results() -> dict[str, Any]:
    """An LM's results: FP32 perplexity 30; weight-only PTQ at 4 bits 30.6 (within 1.03x), at
    3 bits 36 (out), where QAT reaches 33 (half the gap)."""
    rows = [
        result_row("ptq-weight-only-int4", "ptq", "weight_only", 4, None, 30.6, 20_000, 2, 0),
        result_row("qat-int4", "qat", "weight_only", 4, None, 30.3, 20_000, 2, 0, kept_epoch=1),
        result_row("ptq-weight-only-int3", "ptq", "weight_only", 3, None, 36.0, 16_000, 2, 0),
        result_row("qat-int3", "qat", "weight_only", 3, None, 33.0, 16_000, 2, 0, kept_epoch=1),
    ]
    for row in rows:
        row["latency_ms"] = {"bs1": 2.0}
        row.update(tokens_per_s=500.0, peak_memory_bytes=3_000_000)
    return {
        "task": "tiny-lm",
        "metric": "perplexity",
        "tolerance": 0.03,
        "lower_is_better": True,
        "tolerance_rule": tolerance_rule(0.03, True),
        "baseline": {
            "metric": 30.0,
            "size_bytes": 120_000,
            "latency_ms": {"bs1": 4.0},
            "tokens_per_s": 250.0,
            "peak_memory_bytes": 9_000_000,
        },
        "runs": rows,
        "recommendation": {"choice": "ptq-weight-only-int4", "why": "smallest within"},
        "environment": {"threads": 2},
    }


def test_the_tolerance_rule_in_each_direction() -> None:
    assert limit(30.0, 0.03, True) == pytest.approx(30.9) and limit(0.9, 0.01, False) == 0.89
    assert within(30.9, 30.0, 0.03, True) and not within(31.0, 30.0, 0.03, True)
    assert within(0.89, 0.9, 0.01, False) and not within(0.88, 0.9, 0.01, False)
    assert gap_to_fp32(30.0, 36.0, True) == 6.0 and gap_to_fp32(0.9, 0.85, False) == pytest.approx(
        0.05
    )
    assert "1.03x FP32" in tolerance_rule(0.03, True)


def test_pareto_front_and_crossover_read_the_direction() -> None:
    points = [(1.0, 40.0), (2.0, 31.0), (3.0, 35.0), (4.0, 30.0)]
    assert pareto_front(points, lower_is_better=True) == [0, 1, 3]
    assert pareto_front(points) == [0]  # read higher-is-better, 40 at the smallest size wins
    rows = bit_sweep(lm_results())
    assert [(r["label"], r["ptq"], r["qat"]) for r in rows] == [
        ("W4", 30.6, 30.3),
        ("W3", 36.0, 33.0),
    ]
    assert crossover(rows, 30.0, 0.03, lower_is_better=True) == 1
    assert crossover(rows, 30.0, 0.03) is None  # higher-is-better: both "above" FP32 - 0.03


def test_the_report_says_lower_is_better_and_how_much_qat_recovers() -> None:
    data = lm_results()
    header, table_rows, summary = sweep(data) or ([], [], "")
    assert header[3] == "PTQ gap to FP32 (deployed, perplexity)"
    assert table_rows[1][3:5] == ["6", "50 %"]
    assert (
        "at W3 it rises 6 above FP32" in summary and "QAT recovers 3 (50 % of the gap)" in summary
    )
    text = markdown(data)
    assert "lower is better: a run qualifies at 1.03x FP32 or below" in text
    assert "tokens/s (bs1, KV cache)" in text
    assert "| 500.0 | 3.0 |" in text  # tokens/s and peak MB of a run


def test_the_band_lies_above_fp32_where_lower_is_better(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures: list[Any] = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    plots.ptq_vs_qat(lm_results(), tmp_path)
    ax = figures[0].axes[0]
    band = next(p for p in ax.patches if p.get_label().startswith("within"))
    low, high = band.get_y(), band.get_y() + band.get_height()  # axhspan: a Rectangle
    assert (low, high) == pytest.approx((30.0, 30.9))
    assert "lower is better" in ax.get_ylabel()
    assert any("PTQ stops at W3: 1.2x FP32" in t.get_text() for t in ax.texts)
