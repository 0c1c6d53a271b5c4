"""report/runs.py: the runs compare makes. The default set, one PTQ run per recipe (weight-only
recipes run method weight_only), and a Run that cannot run is refused where it is made."""

from __future__ import annotations

import pytest

from edgequant.recipe import Recipe
from edgequant.report.runs import Run, default_runs, runs_for


def test_the_default_set_and_its_qat_runs() -> None:
    runs = default_runs(qat_epochs=2)
    families = {r.name: r.family for r in runs}
    assert families["ptq-static-w8a8"] == "ptq" and families["mixed-w3avg-a8"] == "mixed"
    assert [r.epochs for r in runs if r.family == "qat"] == [2, 2]
    assert len({r.name for r in runs}) == len(runs)
    assert [r.name for r in default_runs(qat=False)] == [r.name for r in runs if r.family != "qat"]


def test_runs_for_names_one_ptq_run_per_recipe() -> None:
    runs = runs_for(["w8a8", Recipe.preset("w4-weight-only")])
    assert [(r.name, r.method) for r in runs] == [
        ("ptq-static-w8a8", "static"),
        ("ptq-weight-only-w4", "weight_only"),
    ]
    with pytest.raises(TypeError, match=r"got the single 'w8a8': pass \['w8a8'\]"):
        runs_for("w8a8")
    with pytest.raises(TypeError, match="got int"):
        runs_for([8])  # type: ignore[list-item]


def test_a_run_that_cannot_run_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="Run 'x': family must be ptq, qat or mixed"):
        Run("x", "static", Recipe.preset("w8a8"), family="fp32")
    with pytest.raises(ValueError, match="Run 'q': a QAT run needs epochs >= 1, got 0"):
        Run("q", "static", Recipe.preset("w8a8"), family="qat")
    with pytest.raises(ValueError, match="Run 'm': a mixed run needs budget_ratio in"):
        Run("m", "static", Recipe.preset("w8a8"), family="mixed", budget_ratio=1.5)
