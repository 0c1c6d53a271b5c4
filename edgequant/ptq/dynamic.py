"""Dynamic PTQ: INT8 weights, activation ranges computed at run time, as ONNX Runtime's
DynamicQuantizeLinear + MatMulInteger run it. Covers Linear layers (transformers, RNN heads)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from edgequant.instrument import Summary, attach_info, batch_size, check_finite, instrument
from edgequant.ptq.calibrate import naming_the_batch, peek
from edgequant.ptq.smooth import describe_split, smooth_and_split_
from edgequant.ptq.static import calibrate_weights
from edgequant.quantizer import quantizers
from edgequant.spec import Recipe, activation_spec


def build_dynamic(
    model: nn.Module, recipe: Recipe, example_batch: Any
) -> tuple[nn.Module, Summary, Recipe]:
    """The instrumented, uncalibrated model and the recipe as dynamic quantization applies it."""
    if recipe.weight is None:
        raise ValueError(f"recipe {recipe.name!r} quantizes no weights")
    if recipe.weight.bits != 8 or (recipe.activation is not None and recipe.activation.bits != 8):
        raise ValueError(
            "dynamic quantization runs as ONNX Runtime's DynamicQuantizeLinear/MatMulInteger: "
            f"8-bit activations and 8-bit weights; recipe {recipe.name!r} asks for "
            f"W{recipe.weight.bits}A{recipe.activation.bits if recipe.activation else '-'}"
        )
    if recipe.weight.granularity == "group":
        raise ValueError(
            "dynamic quantization supports per-tensor or per-channel weights, not per-group"
        )
    # Activations: per-tensor UINT8 computed from each tensor; first/last-layer rule does not apply.
    recipe = recipe.replace(activation=activation_spec(8), first_last_bits=None)
    qmodel, summary = instrument(
        model, recipe, example_batch, method="dynamic", layer_types=(nn.Linear, nn.Embedding)
    )
    return qmodel, summary, recipe


def quantize_dynamic(
    model: nn.Module,
    recipe: Recipe,
    calib_data: Iterable[Any] | None,
    num_samples: int,
    progress: bool,
) -> nn.Module:
    batches: Iterable[Any]  # a list once SmoothQuant has to read it twice
    first, batches = peek(calib_data, "calib_data")
    with naming_the_batch(first, "calib_data item 0"):
        qmodel, summary, recipe = build_dynamic(model, recipe, first)
    samples_used = 0
    if recipe.smooth_alpha is not None or recipe.split_outliers is not None:
        batches = list(batches)
        for index, batch in enumerate(batches):
            check_finite(batch, index)
        smoothed, added = smooth_and_split_(
            qmodel, batches, recipe.smooth_alpha, num_samples, recipe.split_outliers
        )
        samples_used = min(num_samples, sum(batch_size(b) for b in batches))
        if recipe.split_outliers is not None:
            summary.notes.append(describe_split(added))
        if recipe.smooth_alpha is not None:
            summary.notes.append(
                f"SmoothQuant (alpha {recipe.smooth_alpha}) on {len(smoothed)} Linear inputs, "
                f"from {samples_used} calibration samples"
            )
    calibrate_weights(qmodel)
    for q in quantizers(qmodel):
        if q.role == "activation":
            q.set_mode("dynamic")
    attach_info(
        qmodel,
        summary,
        {
            "method": "dynamic",
            "recipe": recipe.to_dict(),
            "samples_used": samples_used,
            "labels_used": False,
        },
    )
    return qmodel
