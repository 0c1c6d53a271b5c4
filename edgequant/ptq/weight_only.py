"""Weight-only PTQ: integer weights, float activations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from edgequant.instrument import Summary, attach_info, instrument
from edgequant.ptq.calibrate import peek
from edgequant.ptq.static import calibrate_weights
from edgequant.spec import Recipe


def build_weight_only(
    model: nn.Module, recipe: Recipe, example_batch: Any
) -> tuple[nn.Module, Summary, Recipe]:
    """The instrumented, uncalibrated model and the recipe without activation specs."""
    if recipe.weight is None:
        raise ValueError(f"recipe {recipe.name!r} quantizes no weights")
    recipe = recipe.replace(
        activation=None,
        overrides=tuple(o.__class__(o.pattern, o.weight, None, o.skip) for o in recipe.overrides),
    )
    qmodel, summary = instrument(model, recipe, example_batch, method="weight_only")
    return qmodel, summary, recipe


def quantize_weight_only(
    model: nn.Module,
    recipe: Recipe,
    calib_data: Iterable[Any] | None,
    num_samples: int,
    progress: bool,
) -> nn.Module:
    # One batch finds the execution order (first/last layer) and the foldable BatchNorms.
    first, _ = peek(calib_data, "calib_data (one example batch)")
    qmodel, summary, recipe = build_weight_only(model, recipe, first)
    calibrate_weights(qmodel)
    attach_info(
        qmodel,
        summary,
        {
            "method": "weight_only",
            "recipe": recipe.to_dict(),
            "samples_used": 0,
            "labels_used": False,
        },
    )
    return qmodel
