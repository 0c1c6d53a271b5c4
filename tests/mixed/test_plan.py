"""eq.mixed_precision / eq.mixed.plan on the MNIST-1D CNN: the recipe, its YAML round trip,
eq.quantize of it (the accuracy-target search is tested in test_search.py); and bad arguments to
plan, progressive and mixed_precision refused where they enter, with the argument and the value
named, before any slow work (a two-layer MLP keeps those quick)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from toys import nearest_recipe, never_called, weight_bits  # tests/toys.py

import edgequant as eq
from edgequant.mixed import MixedPlan, plan, progressive

RECIPE = nearest_recipe(64)


def test_plan_meets_the_budget_and_names_every_layer(plan3: MixedPlan) -> None:
    assert set(plan3.bits) == {"conv1", "conv2", "conv3", "linear"}
    assert plan3.average_bits <= 3.0 + 1e-9
    assert plan3.packed_bytes == sum(plan3.costs.params[n] * b / 8 for n, b in plan3.bits.items())
    assert plan3.fp32_bytes == 4 * sum(plan3.costs.params.values())
    # The optimum of every plan within the budget, checked by enumeration (4^4 plans). Whether it
    # is uniform depends on the measured scores, which differ in the last bits between CPUs
    # (uniform 3-bit on an AVX2 machine, mixed on an AVX-512 one), so that is not asserted.
    scores, params = plan3.sensitivity.scores, plan3.costs.params
    names = sorted(plan3.bits)
    limit = 3.0 * sum(params.values()) / 8 + 1e-6
    best = min(
        sum(scores[n][b] for n, b in zip(names, combo, strict=True))
        for combo in itertools.product(plan3.candidates, repeat=len(names))
        if sum(params[n] * b / 8 for n, b in zip(names, combo, strict=True)) <= limit
    )
    assert plan3.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert plan3.recipe.name.startswith("mixed-w")
    assert plan3.recipe.first_last_bits is None
    assert {o.pattern for o in plan3.recipe.overrides} == set(plan3.bits)
    table = plan3.table()
    for name, bits in plan3.bits.items():
        assert name in table and str(bits) in table
    assert plan3.costs.macs["conv2"] == 40 * 32 * 32 * 5  # length 40, 32 -> 32 channels, kernel 5


def test_the_recipe_round_trips_through_yaml_and_quantizes_as_planned(
    plan3: MixedPlan, cnn, calib, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.yaml"
    plan3.recipe.to_yaml(path)
    loaded = eq.Recipe.from_yaml(path)
    assert loaded == plan3.recipe
    qmodel = eq.quantize(cnn, loaded, calib)
    assert weight_bits(qmodel) == plan3.bits


def test_the_plan_scores_no_worse_than_uniform_3_bit(plan3: MixedPlan) -> None:
    """Uniform 3-bit weights fit the 3.0-bit budget, so the optimum's total sensitivity is at most
    theirs (and the objective is the sum of the chosen scores)."""
    scores = plan3.sensitivity.scores
    chosen = sum(scores[n][b] for n, b in plan3.bits.items())
    assert plan3.objective == pytest.approx(chosen)
    assert chosen <= sum(row[3] for row in scores.values()) + 1e-12


def test_mixed_precision_returns_the_recipe(cnn, calib) -> None:
    recipe = eq.mixed_precision(
        cnn, calib_data=calib, budget=eq.Budget(size_ratio=0.25), recipe=RECIPE, num_samples=64,
        candidates=(4, 8),
    )  # fmt: skip
    assert isinstance(recipe, eq.Recipe)
    assert all(o.weight is not None and o.weight.bits == 8 for o in recipe.overrides)


def test_hessian_method_and_comparison(cnn, calib) -> None:
    p = plan(
        cnn, calib, budget=eq.Budget.average_bits(3.0), recipe=RECIPE, num_samples=64,
        method="hessian", compare=True, hessian_samples=3, candidates=(2, 8),
    )  # fmt: skip
    assert p.method == "hessian" and p.sensitivity.method == "hessian"
    assert p.other is not None and p.other.method == "perturbation"
    assert sorted(p.spearman) == [2, 8]
    assert all(-1 <= r <= 1 for r in p.spearman.values())
    assert p.average_bits <= 3.0 + 1e-9


def test_reused_sensitivities_and_an_infeasible_budget(plan3: MixedPlan, cnn, calib) -> None:
    p = plan(cnn, calib, budget=eq.Budget.average_bits(2.5), recipe=RECIPE,
             sensitivities=plan3.sensitivity)  # fmt: skip
    assert p.average_bits <= 2.5 + 1e-9
    assert p.sensitivity is plan3.sensitivity
    smallest = sum(plan3.costs.params.values()) * 2 / 8
    with pytest.raises(ValueError, match=f"smallest achievable size .* {smallest:,.0f} bytes"):
        plan(cnn, calib, budget=eq.Budget.average_bits(1.5), recipe=RECIPE,
             sensitivities=plan3.sensitivity)  # fmt: skip


def test_a_metric_that_is_not_a_finite_number_is_refused(plan3: MixedPlan, cnn, calib) -> None:
    """A NaN compares false with every tolerance: taken as it is, it would quietly reject every
    plan but the largest. The error names the model it came from."""
    with pytest.raises(ValueError, match="returned nan for the FP32 model"):
        plan(cnn, calib, eval_fn=lambda m: float("nan"), max_drop=0.01, recipe=RECIPE,
             sensitivities=plan3.sensitivity)  # fmt: skip
    with pytest.raises(ValueError, match=r"returned inf for the plan at 8\.00 bits"):
        plan(cnn, calib, eval_fn=lambda m: 1.0 if m is cnn else float("inf"), max_drop=0.01,
             recipe=RECIPE, sensitivities=plan3.sensitivity)  # fmt: skip
    with pytest.raises(TypeError, match="must return a number.*returned str"):
        progressive(cnn, calib, lambda m: "0.9", max_drop=0.01, recipe=RECIPE,
                    sensitivities=plan3.sensitivity)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "give budget="),
        ({"budget": {"size_ratio": 0.1}}, TypeError, "edgequant.Budget"),
        ({"max_drop": 0.01}, ValueError, "needs eval_fn"),
        ({"budget": eq.Budget(size_ratio=0.1), "method": "hawq"}, ValueError, "perturbation"),
        ({"max_drop": -1, "eval_fn": len}, ValueError, "max_drop must be a number >= 0"),
    ],
)
def test_plan_argument_errors(cnn, calib, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        plan(cnn, calib, **kwargs)


CHECK_RECIPE = nearest_recipe(32)


def test_candidates_of_mixed_types_name_the_bad_one(mlp, batches) -> None:
    # Before: sorted() raised "'<' not supported between instances of 'int' and 'str'".
    with pytest.raises(ValueError, match=r"candidate bit width '8' is invalid: ints in 2\.\.16"):
        bad: Any = [4, "8"]
        plan(mlp, batches, budget=eq.Budget(size_ratio=0.2), candidates=bad)


@pytest.mark.parametrize("workflow", ["plan", "progressive"])
def test_fixed_must_be_a_mapping(mlp, batches, workflow: str) -> None:
    # Before: dict(["0"]) raised "dictionary update sequence element #0 has length 1".
    bad: Any = ["0"]
    with pytest.raises(
        TypeError, match=r"fixed must be a mapping of layer name -> bits.*list \['0'\]"
    ):
        if workflow == "plan":
            plan(mlp, batches, budget=eq.Budget(size_ratio=0.2), fixed=bad)
        else:
            progressive(mlp, batches, never_called, 0.01, fixed=bad)


@pytest.mark.parametrize("workflow", ["plan", "progressive"])
def test_a_nan_tolerance_is_refused(mlp, batches, workflow: str) -> None:
    # Before: every drop compared false with NaN, and the all-8-bit plan came back as the answer.
    with pytest.raises(ValueError, match="max_drop must be a number >= 0, got nan"):
        if workflow == "plan":
            plan(mlp, batches, eval_fn=never_called, max_drop=float("nan"))
        else:
            progressive(mlp, batches, never_called, float("nan"))


@pytest.mark.parametrize("workflow", ["plan", "progressive"])
def test_sensitivities_of_another_type_are_named(mlp, batches, workflow: str) -> None:
    # Before: AttributeError: 'dict' object has no attribute 'candidates'.
    scores: Any = {"0": {8: 0.0}, "2": {8: 0.0}}
    with pytest.raises(
        TypeError, match="sensitivities must be an edgequant.mixed.Sensitivity, got dict"
    ):
        if workflow == "plan":
            plan(mlp, batches, budget=eq.Budget(size_ratio=0.2), sensitivities=scores)
        else:
            progressive(mlp, batches, never_called, 0.01, sensitivities=scores)


@pytest.mark.parametrize("workflow", ["plan", "progressive", "mixed_precision"])
@pytest.mark.parametrize("made_by", ["eq.quantize", "eq.prepare_qat"])
def test_an_already_quantized_model_is_refused(mlp, batches, workflow: str, made_by: str) -> None:
    # Before: "the model has no quantizable layer (Conv1d, Conv2d, Linear, Embedding) ...".
    if made_by == "eq.quantize":
        qmodel = eq.quantize(mlp, "w8a8", batches)
    else:
        qmodel = eq.prepare_qat(mlp, "w8a8", batches)
    match = f"model is already quantized by {made_by} .*'0.weight_quantizer'.*pass the FP32 model"
    with pytest.raises(ValueError, match=match):
        if workflow == "plan":
            plan(qmodel, batches, budget=eq.Budget(size_ratio=0.2))
        elif workflow == "mixed_precision":
            eq.mixed_precision(qmodel, batches, budget=eq.Budget(size_ratio=0.2))
        else:
            progressive(qmodel, batches, never_called, 0.01)
