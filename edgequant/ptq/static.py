"""Static PTQ: weights and activations calibrated ahead of time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from torch import nn

from edgequant.instrument import Summary, attach_info, instrument, place_graph_quantizers
from edgequant.modules import QuantMixin
from edgequant.ptq.calibrate import peek, run_calibration
from edgequant.quantizer import quantizers
from edgequant.spec import Recipe


def calibrate_weights(qmodel: nn.Module) -> None:
    """Fix every weight quantizer from its (BN-folded) weight."""
    for q in quantizers(qmodel):
        if q.role == "weight":
            layer = cast(QuantMixin, qmodel.get_submodule(q.name.rsplit(".", 1)[0]))
            q.calibrate_tensor(layer.weight)
            q.set_mode("quantize")


def build_static(
    model: nn.Module, recipe: Recipe, example_batch: Any
) -> tuple[nn.Module, Summary, Recipe]:
    """The instrumented, uncalibrated model (shared by quantize and load)."""
    if recipe.activation is None:
        raise ValueError(
            f"recipe {recipe.name!r} quantizes no activations: use method='weight_only'"
        )
    qmodel, summary = instrument(model, recipe, example_batch, method="static")
    if recipe.quantize_outputs:
        qmodel = place_graph_quantizers(qmodel, summary)
    return qmodel, summary, recipe


def quantize_static(
    model: nn.Module,
    recipe: Recipe,
    calib_data: Iterable[Any] | None,
    num_samples: int,
    progress: bool,
) -> nn.Module:
    first, batches = peek(calib_data)
    qmodel, summary, recipe = build_static(model, recipe, first)
    calibrate_weights(qmodel)
    used = run_calibration(qmodel, batches, num_samples, progress)
    attach_info(
        qmodel,
        summary,
        {
            "method": "static",
            "recipe": recipe.to_dict(),
            "samples_used": used,
            "labels_used": False,
        },
    )
    return qmodel
