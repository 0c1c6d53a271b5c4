"""`edgequant demo`: its runs (PTQ and QAT of one recipe at each width of the bit sweep) and, slow,
the quick demo end to end: the report shows where PTQ stops, the QAT epoch choice's evidence,
and that QAT and PTQ of one recipe export one graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgequant.recipe import Recipe
from edgequant.report.demo import QUICK_SWEEP, SWEEP, demo_runs


@pytest.mark.parametrize("quick", [False, True])
def test_demo_runs_pair_ptq_and_qat_of_one_recipe_down_the_sweep(quick: bool) -> None:
    runs = {run.name: run for run in demo_runs(quick)}
    sweep = QUICK_SWEEP if quick else SWEEP
    for preset in sweep:
        ptq = runs[f"ptq-static-{preset}"]
        assert ptq.family == "ptq" and ptq.method == "static"
        if quick and preset == "w8a8":
            assert f"qat-{preset}" not in runs  # PTQ holds at 8 bits: --quick spends below
            continue
        qat = runs[f"qat-{preset}"]
        # QAT starts from exactly the PTQ model it is compared with: the same recipe.
        assert qat.family == "qat" and qat.recipe == ptq.recipe and qat.epochs >= 1
        assert qat.lr is None  # fit_qat's default, what a user gets
        low = ptq.recipe.weight is not None and ptq.recipe.weight.bits < 8
        assert ptq.recipe.rounding == ("gptq" if low else Recipe.preset(preset).rounding)
    assert len(runs) == len(demo_runs(quick))  # names are unique


@pytest.mark.slow
def test_quick_demo_reports_the_bit_sweep_its_evidence_and_one_graph(tmp_path: Path) -> None:
    from edgequant.report.demo import run_demo

    run_demo(tmp_path / "demo", quick=True, quiet=True)
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    text = (tmp_path / "demo" / "report.md").read_text()
    assert "## PTQ vs QAT by bits" in text
    assert (tmp_path / "demo" / "plots" / "ptq_vs_qat.png").is_file()
    assert "metric_test" in results["baseline"]
    qat = [r for r in results["runs"] if r["family"] == "qat"]
    assert qat and all(r["status"] == "ok" for r in qat)
    for run in qat:
        # The epoch choice's evidence: per-epoch held-out hits on signals no model trained on.
        assert len(run["selection"]["heldout_top1"]) == run["epochs"] + 1
        assert run["selection"]["held_out_samples"] == 500
        assert run["selection"]["why"] in text
    pairs = results["qat_vs_ptq_speed"]
    assert [p["bits"] for p in pairs] == ["W4A4", "W2A2"]
    assert all(p["same_graph"] for p in pairs)
