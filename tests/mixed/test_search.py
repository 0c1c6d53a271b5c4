"""The accuracy-target search of mixed.plan (mixed/search.py) on the MNIST-1D CNN: the smallest
plan within the tolerance by measurement, uniform widths tried as such, an unreachable tolerance
and an infeasible budget refused."""

from __future__ import annotations

import pytest
import torch
from toys import nearest_recipe, never_called, weight_bits  # tests/toys.py

import edgequant as eq
from edgequant.mixed import MixedPlan, plan

RECIPE = nearest_recipe(64)
CHECK_RECIPE = nearest_recipe(32)


def test_accuracy_target_mode_meets_the_tolerance_by_measurement(
    plan3: MixedPlan, cnn, calib, val_acc
) -> None:
    p = plan(cnn, calib, eval_fn=val_acc, max_drop=0.01, recipe=RECIPE,
             sensitivities=plan3.sensitivity, search_steps=4)  # fmt: skip
    assert p.drop is not None and p.drop <= 0.01
    assert p.trials[0].accepted  # the all-8-bit plan first
    # The two ends and two bisections, with up to one uniform plan per intermediate width
    # (3 and 4 bits) between them.
    bisections = [t for t in p.trials if t.source == "bisection"]
    assert len(bisections) == 4 and 0 <= len(p.trials) - 4 <= 2
    accepted = [t for t in p.trials if t.accepted]
    assert p.packed_bytes == min(t.packed_bytes for t in accepted)
    # Confirm independently: quantize the returned recipe and measure again.
    assert val_acc(cnn) - val_acc(eq.quantize(cnn, p.recipe, calib)) == pytest.approx(p.drop)


def test_accuracy_target_mode_tries_uniform_widths(plan3: MixedPlan, cnn, calib) -> None:
    """A metric that only uniform plans of at least 3 bits pass: the integer program's mixed plans
    all fail it, so the search must find uniform 3-bit weights by trying them as such."""

    def uniform_only(model: torch.nn.Module) -> float:
        widths = set(weight_bits(model).values())
        return 1.0 if not widths or (len(widths) == 1 and min(widths) >= 3) else 0.0

    p = plan(cnn, calib, eval_fn=uniform_only, max_drop=0.5, recipe=RECIPE,
             sensitivities=plan3.sensitivity, search_steps=4)  # fmt: skip
    assert set(p.bits.values()) == {3}
    assert [t.source for t in p.trials[:3]] == ["bisection", "bisection", "uniform"]
    assert [t.accepted for t in p.trials[:3]] == [True, False, True]
    # The bisections then search below the uniform plan, and fail.
    assert all(t.packed_bytes < p.packed_bytes and not t.accepted for t in p.trials[3:])


def test_unreachable_tolerance_is_an_error(plan3: MixedPlan, cnn, calib, val_acc) -> None:
    with pytest.raises(ValueError, match="unreachable"):
        # Every quantized model scores 0, the FP32 model 1: not even 8 bits keeps the metric.
        plan(cnn, calib, eval_fn=lambda m: 1.0 if m is cnn else 0.0, max_drop=0.5, recipe=RECIPE,
             sensitivities=plan3.sensitivity)  # fmt: skip


def test_an_infeasible_budget_in_accuracy_target_mode_keeps_its_name(mlp, batches) -> None:
    # Before: "Budget size_bytes is infeasible" for a size_ratio the caller gave (the search
    # re-states size bounds in bytes), and after the FP32 model had been measured.
    smallest = (8 * 16 + 16 * 4) * 2 / 8
    match = f"Budget size_ratio is infeasible: .* smallest achievable size .* {smallest:,.0f} bytes"
    with pytest.raises(ValueError, match=match):
        plan(mlp, batches, budget=eq.Budget(size_ratio=0.01), eval_fn=never_called,
             max_drop=0.01, recipe=CHECK_RECIPE, num_samples=32)  # fmt: skip
