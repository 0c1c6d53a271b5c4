"""mixed.progressive, the hybrid workflow, on the MNIST-1D CNN: it lowers the least sensitive
layers while the measured metric holds, then optionally a short QAT; and its arguments refused
before the search (a two-layer MLP keeps those quick)."""

from __future__ import annotations

import pytest
import torch
from toys import nearest_recipe, never_called, weight_bits  # tests/toys.py

from edgequant.mixed import MixedPlan, progressive

RECIPE = nearest_recipe(64)


def test_progressive_lowers_layers_while_the_metric_holds(plan3: MixedPlan, cnn, calib, val_acc):
    p = progressive(cnn, calib, val_acc, max_drop=0.01, recipe=RECIPE,
                    sensitivities=plan3.sensitivity, max_steps=4)  # fmt: skip
    assert p.drop is not None and p.drop <= 0.01
    assert len(p.trials) == 5  # the all-8-bit start and four moves
    assert p.average_bits < 8
    assert p.qmodel is not None and weight_bits(p.qmodel) == p.bits
    assert val_acc(cnn) - val_acc(p.qmodel) == pytest.approx(p.drop)


def test_progressive_qat_needs_training_data(cnn, calib, val_acc) -> None:
    with pytest.raises(ValueError, match="needs train_data"):
        progressive(cnn, calib, val_acc, max_drop=0.01, qat_epochs=1)


def test_progressive_then_a_short_qat(plan3: MixedPlan, cnn, calib, val_acc) -> None:
    from edgequant.examples import mnist1d

    p = progressive(cnn, calib, val_acc, max_drop=0.02, recipe=RECIPE,
                    sensitivities=plan3.sensitivity, max_steps=2, qat_epochs=1,
                    train_data=mnist1d.train_batches()[:4])  # fmt: skip
    assert p.method == "progressive+qat1"
    assert p.qmodel is not None and not p.qmodel.training
    # The drop reported is that of the trained model, measured.
    assert val_acc(cnn) - val_acc(p.qmodel) == pytest.approx(p.drop)


def test_progressive_max_steps_true_is_not_one(mlp, batches) -> None:
    with pytest.raises(ValueError, match="max_steps must be a positive int or None, got True"):
        progressive(mlp, batches, never_called, 0.01, max_steps=True)


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
