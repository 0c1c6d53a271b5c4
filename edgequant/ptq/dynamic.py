"""Dynamic PTQ: INT8 weights, activation ranges computed at run time, as ONNX Runtime's
DynamicQuantizeLinear + MatMulInteger run it. Covers Linear layers (transformers, RNN heads)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from edgequant.attention import note_float_attention
from edgequant.batches import batch_size, naming_the_batch
from edgequant.instrument import instrument
from edgequant.ptq.calibrate import collect, peek
from edgequant.ptq.static import apply_outlier_steps, attach_ptq_info, calibrate_weights
from edgequant.quantizer import quantizers
from edgequant.recipe import Recipe
from edgequant.spec import activation_spec
from edgequant.summary import Summary


def build_dynamic(
    model: nn.Module, recipe: Recipe, example_batch: Any | None
) -> tuple[nn.Module, Summary, Recipe]:
    """The instrumented, uncalibrated model and the recipe as dynamic quantization applies it
    (example_batch None: no run; every Linear and Embedding is quantized)."""
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
    for override in recipe.overrides:
        if override.activation is not None and override.activation.bits != 8:
            raise ValueError(
                f"recipe {recipe.name!r}: override {override.pattern!r} asks for "
                f"{override.activation.bits}-bit activations; dynamic quantization computes "
                "8-bit ones at run time (UINT8, as MatMulInteger reads them)"
            )
    # Activations: UINT8 computed from each input at run time (per token or per tensor, as
    # Recipe.dynamic_activation says); the first/last-layer rule does not apply.
    recipe = recipe.replace(activation=activation_spec(8), first_last_bits=None)
    qmodel, summary = instrument(
        model, recipe, example_batch, method="dynamic", layer_types=(nn.Linear, nn.Embedding)
    )
    note_float_attention(
        qmodel, example_batch, summary, "dynamic quantization covers Linear and Embedding layers"
    )
    return qmodel, summary, recipe


def quantize_dynamic(
    model: nn.Module,
    recipe: Recipe,
    calib_data: Iterable[Any] | None,
    num_samples: int,
    progress: bool,
) -> nn.Module:
    """Dynamic PTQ. calib_data is optional: without it the weights are rounded to nearest and
    nothing reads activations (outlier splitting and SmoothQuant, which need activation ranges,
    are off, and quant_info["pipeline"] says so); with it, the Linear inputs with outlier
    channels are split and smoothed as the recipe asks ("auto": ptq/outliers.py)."""
    if calib_data is None:
        for label, value in (
            ("smooth_alpha", recipe.smooth_alpha),
            ("split_outliers", recipe.split_outliers),
        ):
            if value not in (None, "auto"):
                raise ValueError(
                    f"recipe {recipe.name!r}: {label}={value!r} needs calib_data (it reads the "
                    f"Linear inputs' ranges); pass calib_data or set {label}=None"
                )
        qmodel, summary, recipe = build_dynamic(model, recipe, None)
        pipeline: dict[str, Any] = {
            "outliers": "not inspected: no calib_data",
            "reasons": {
                "smooth_alpha": "no calib_data: off (SmoothQuant needs activation ranges)",
                "split_outliers": "no calib_data: off (splitting needs activation ranges)",
            },
        }
        steps = [f"weights rounded to nearest; {_ranges(recipe)}"]
        summary.notes.append(
            "no calib_data: outlier splitting and SmoothQuant off (they need activation ranges)"
        )
        samples_used = 0
    else:
        first, batches = peek(calib_data, "calib_data")
        with naming_the_batch(first, "calib_data item 0"):
            qmodel, summary, recipe = build_dynamic(model, recipe, first)
        samples_used = 0
        pipeline, steps = {"outliers": "not inspected: smooth_alpha and split_outliers are off"}, []
        if recipe.smooth_alpha is not None or recipe.split_outliers is not None:
            data = collect(batches, num_samples, summary.notes)
            samples_used = sum(batch_size(b) for b in data)
            pipeline, steps, _ = apply_outlier_steps(qmodel, recipe, data, samples_used, summary)
            summary.notes.extend(steps)  # dynamic models print their steps in the summary
        steps.append(f"weights rounded to nearest; {_ranges(recipe)}")
    ranges = _ranges(recipe)
    summary.notes.append(ranges[0].upper() + ranges[1:])
    calibrate_weights(qmodel)
    for q in quantizers(qmodel):
        if q.role == "activation":
            q.set_mode("dynamic")
            q.per_token = recipe.dynamic_activation == "token"
    attach_ptq_info(qmodel, summary, "dynamic", recipe, pipeline, steps, samples_used)
    return qmodel


def _ranges(recipe: Recipe) -> str:
    per = (
        "each token (a scale and zero point per row of each Linear input)"
        if recipe.dynamic_activation == "token"
        else "each input tensor"
    )
    return f"activation ranges computed at run time for {per}"
