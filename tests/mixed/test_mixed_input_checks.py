"""Bad arguments to eq.mixed_precision / mixed.plan / mixed.progressive: refused where they enter,
with the argument and the value named, before any slow work (a two-layer MLP keeps these quick)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.mixed import plan, progressive
from edgequant.mixed.sensitivity import base_recipe

RECIPE = base_recipe(None, 8).replace(calib_samples=32, rounding="nearest", bias_correction=False)


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    return list(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)).split(16))


def never_called(model: nn.Module) -> float:
    raise AssertionError("eval_fn ran: the bad argument was not refused before the search")


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


def test_progressive_max_steps_true_is_not_one(mlp, batches) -> None:
    with pytest.raises(ValueError, match="max_steps must be a positive int or None, got True"):
        progressive(mlp, batches, never_called, 0.01, max_steps=True)


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


def test_an_infeasible_budget_in_accuracy_target_mode_keeps_its_name(mlp, batches) -> None:
    # Before: "Budget size_bytes is infeasible" for a size_ratio the caller gave (the search
    # re-states size bounds in bytes), and after the FP32 model had been measured.
    smallest = (8 * 16 + 16 * 4) * 2 / 8
    match = f"Budget size_ratio is infeasible: .* smallest achievable size .* {smallest:,.0f} bytes"
    with pytest.raises(ValueError, match=match):
        plan(mlp, batches, budget=eq.Budget(size_ratio=0.01), eval_fn=never_called,
             max_drop=0.01, recipe=RECIPE, num_samples=32)  # fmt: skip


TRAIN = [(torch.randn(16, 8), torch.randint(0, 4, (16,)))]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # Before: the search ran for nothing, then fit_qat raised "got multiple values for
        # keyword argument 'epochs'" (or ran with an argument that does not exist).
        ({"qat_kwargs": {"epochs": 2}}, ValueError, r"qat_kwargs\['epochs'\] is set by"),
        ({"qat_kwargs": {"teacher": None}}, ValueError, r"qat_kwargs\['teacher'\] is set by"),
        ({"qat_kwargs": {"learning_rate": 1e-4}}, ValueError,
         r"qat_kwargs\['learning_rate'\] is not an argument of edgequant.fit_qat; valid: .*\blr\b"),
        ({"qat_kwargs": [("lr", 1e-4)]}, TypeError, "qat_kwargs must be a mapping .* got list"),
        ({"train_data": []}, ValueError, "train_data is empty"),
    ],
)  # fmt: skip
def test_progressive_checks_the_qat_arguments_before_the_search(
    mlp, batches, kwargs: dict, error: type, match: str
) -> None:
    options = {"train_data": TRAIN, **kwargs}
    with pytest.raises(error, match=match):
        progressive(mlp, batches, never_called, 0.01, qat_epochs=1, **options)


def test_progressive_refuses_qat_arguments_without_qat_epochs(mlp, batches) -> None:
    # Before: train_data was ignored without a word and the plan came back untrained.
    with pytest.raises(ValueError, match="train_data given but qat_epochs is 0, so no QAT runs"):
        progressive(mlp, batches, never_called, 0.01, train_data=TRAIN)
