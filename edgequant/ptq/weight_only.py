"""Weight-only PTQ: integer weights, float activations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from edgequant.batches import batch_size, naming_the_batch
from edgequant.functional import nbits_form, nbits_form_missing
from edgequant.instrument import instrument
from edgequant.modules import QuantLinear
from edgequant.ptq.calibrate import collect, peek
from edgequant.ptq.decoder import find_blocks, is_decoder_stack, quantize_blocks_
from edgequant.ptq.static import (
    apply_refinement,
    attach_ptq_info,
    calibrate_weights,
    pipeline_notes,
    resolve_pipeline,
)
from edgequant.recipe import Recipe
from edgequant.summary import Summary


def decoder_rule(recipe: Recipe, qmodel: nn.Module, pipeline: dict[str, Any]) -> bool:
    """Whether the block-by-block decoder pipeline (ptq/decoder.py) runs, and its steps:
    at <= 4 weight bits on a model whose quantized Linears sit mostly in one stack of repeated
    blocks (a transformer LM), AWQ scaling, clipping search and GPTQ, each unless the recipe
    turns it off. Updates `pipeline` (steps and reasons) in place."""
    bits = lowest_block_bits(qmodel)
    if bits is None or bits > 4 or not is_decoder_stack(qmodel):
        pipeline["awq"] = bool(recipe.awq)
        pipeline["clip_search"] = bool(recipe.clip_search)
        pipeline["scale_refit"] = bool(recipe.scale_refit)
        if recipe.awq or recipe.clip_search or recipe.scale_refit:
            raise ValueError(
                f"recipe {recipe.name!r}: awq, clip_search and scale_refit run in the decoder "
                "pipeline, "
                "which needs a stack of repeated blocks of Linears quantized at <= 4 bits "
                "(a causal LM); this model or recipe has none"
            )
        return False
    reasons = pipeline["reasons"]
    why = f"{bits}-bit weights in a stack of repeated blocks: block by block"
    for label, value in (("awq", recipe.awq), ("clip_search", recipe.clip_search)):
        pipeline[label] = value if value is not None else True
        reasons[label] = "recipe" if value is not None else why
    # The refit lowers each layer's output error on the calibration tokens, yet raised the
    # perplexity of held-out text (SmolLM2-135M, INT4 g64, benchmarks/smollm2_heldout.py): it
    # fits the calibration tokens, not the language. Off unless the recipe asks for it.
    pipeline["scale_refit"] = bool(recipe.scale_refit)
    reasons["scale_refit"] = (
        "recipe"
        if recipe.scale_refit is not None
        else "off: it lowers the calibration tokens' output error but raised held-out perplexity"
    )
    if recipe.rounding == "auto":
        pipeline["rounding"] = "gptq"
        reasons["rounding"] = why
    elif recipe.rounding not in ("gptq", "nearest"):
        raise ValueError(
            f"recipe {recipe.name!r}: rounding={recipe.rounding!r} is not available in the "
            "decoder pipeline (block by block); use 'gptq', 'nearest' or 'auto'"
        )
    # Bias correction layer by layer would re-run the whole model per layer; LLaMA-style
    # decoders have no Linear biases.
    pipeline["bias_correction"] = False
    reasons["bias_correction"] = "off in the decoder pipeline"
    pipeline["rounding_target"] = "quantized"
    return True


def is_llama_style(model: nn.Module) -> bool:
    """A LLaMA-style causal LM as the LM export takes it: .config, .model.embed_tokens /
    .layers / .norm and .lm_head."""
    inner = getattr(model, "model", None)
    return (
        getattr(model, "config", None) is not None
        and isinstance(getattr(model, "lm_head", None), nn.Linear)
        and inner is not None
        and all(hasattr(inner, r) for r in ("embed_tokens", "layers", "norm"))
    )


def block_int8_rule(recipe: Recipe, qmodel: nn.Module, pipeline: dict[str, Any]) -> bool:
    """Which quantized Linears of a causal LM get their input rounded to int8 at run time, per
    token and per block (Recipe.block_int8_inputs; functional.block_int8_fake_quantize), the
    blocks being those of their MatMulNBits form, so that the LM export writes them at
    accuracy_level=4: ONNX Runtime's int8 path, at batch 1 2-6x faster than its float path
    (benchmarks/matmul_nbits_levels.py). "all" (auto, True): every quantized Linear with a
    MatMulNBits form (functional.nbits_form, the rule the export packs by; the others are left
    out), the lm_head included; "lm_head": the lm_head only, the last rounding, so that the
    export verifies token by token. An lm_head without a form turns auto off (the reason
    recorded) and is an error naming it and why where the recipe asks for the inputs. Rounding
    inside the stack of blocks makes the model chaotic at the size of float rounding
    (BENCHMARKS.md, stop 35), so such an export is verified against the simulation's own noise
    floor (export/lm.py). Auto: on for a LLaMA-style causal LM with <= 4-bit weights in its
    stack of blocks under the onnxruntime target. Records the choice, its reason and the layers
    in `pipeline`."""
    reasons = pipeline["reasons"]
    bits = lowest_block_bits(qmodel)
    lm = is_llama_style(qmodel) and bits is not None and bits <= 4
    on = recipe.block_int8_inputs
    if on is None:
        on = "all" if lm and recipe.target == "onnxruntime" else False
        reasons["block_int8_inputs"] = (
            f"{bits}-bit weights in a LLaMA-style causal LM for onnxruntime: its Linears as "
            "MatMulNBits at accuracy_level=4 (int8 inputs per token and block), the fast CPU "
            "path; the lm_head too"
            if on
            else "not a LLaMA-style causal LM at <= 4 weight bits for onnxruntime"
        )
    else:
        reasons["block_int8_inputs"] = "recipe"
    scope = "all" if on is True else on
    pipeline["block_int8_inputs"] = scope
    if not scope:
        return False
    if not is_llama_style(qmodel):
        raise ValueError(
            f"recipe {recipe.name!r}: block_int8_inputs={on!r} needs a LLaMA-style causal LM "
            f"(the LM export's MatMulNBits form); got {type(qmodel).__name__}"
        )
    head = qmodel.get_submodule("lm_head")
    why = _nbits_form_missing("lm_head", head)
    if why:
        if recipe.block_int8_inputs is not None:
            raise ValueError(f"recipe {recipe.name!r}: block_int8_inputs={on!r}, but {why}")
        pipeline["block_int8_inputs"] = False
        reasons["block_int8_inputs"] = f"off: {why}"
        return False
    layers: dict[str, QuantLinear] = {"lm_head": cast(QuantLinear, head)}
    if scope == "all":
        found = find_blocks(qmodel)
        prefix, stack = found if found is not None else ("", nn.ModuleList())
        for name, layer in stack.named_modules():
            if not _nbits_form_missing(name, layer):
                layers[f"{prefix}.{name}"] = cast(QuantLinear, layer)
    for layer in layers.values():
        layer.input_block_int8 = torch.tensor(_nbits_block(layer), dtype=torch.int64)
    pipeline["block_int8_layers"] = sorted(layers, key=lambda n: (n == "lm_head", n))
    return True


def _nbits_block(layer: QuantLinear) -> int | None:
    """The block of `layer`'s MatMulNBits form (None: it has none; functional.nbits_form, the
    rule the LM export packs by)."""
    wq = layer.weight_quantizer
    return None if wq is None else nbits_form(wq.spec, layer.in_features)


def _nbits_form_missing(name: str, layer: nn.Module) -> str:
    """Why `layer` has no MatMulNBits form ("" where it has one): not quantized, or
    functional.nbits_form_missing's reason."""
    wq = getattr(layer, "weight_quantizer", None)
    if not isinstance(layer, QuantLinear) or wq is None or wq.mode != "quantize":
        return f"{name} is not quantized"
    why = nbits_form_missing(wq.spec, layer.in_features)
    if why:
        return (
            f"{name} ({layer.in_features} inputs, {wq.spec.short()}) has no MatMulNBits form: {why}"
        )
    return ""


def lowest_block_bits(qmodel: nn.Module) -> int | None:
    """The lowest weight bits among the quantized Linears inside the stack of blocks."""
    found = find_blocks(qmodel)
    if found is None:
        return None
    bits = [
        m.weight_quantizer.spec.bits
        for m in found[1].modules()
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None
    ]
    return min(bits) if bits else None


def build_weight_only(
    model: nn.Module, recipe: Recipe, example_batch: Any | None
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
    """Weight-only PTQ. calib_data is optional: without it the weights are rounded to nearest
    ("auto" rounding and bias correction, which read the layers' inputs, are off, and
    quant_info["pipeline"] says so). With it, one batch finds the execution order (first/last
    layer) and the foldable BatchNorms, and learned rounding and bias correction (default at
    <= 4 bits) read up to num_samples."""
    if recipe.split_outliers not in (None, "auto"):
        raise ValueError(
            f"recipe {recipe.name!r}: split_outliers splits the channels of quantized inputs; "
            "weight-only quantization quantizes none (set split_outliers=None)"
        )
    if calib_data is None:
        qmodel, summary, recipe, pipeline = _build_without_data(model, recipe)
        batches: Iterable[Any] = ()
    else:
        first, batches = peek(calib_data, "calib_data (one example batch)")
        with naming_the_batch(first, "calib_data item 0"):
            qmodel, summary, recipe = build_weight_only(model, recipe, first)
        pipeline = resolve_pipeline(recipe, qmodel)
    calibrate_weights(qmodel)
    steps = ["weight ranges calibrated"]
    used = 0
    if calib_data is not None and decoder_rule(recipe, qmodel, pipeline):
        data = collect(batches, num_samples, summary.notes)
        used = sum(batch_size(b) for b in data)
        notes, record = quantize_blocks_(
            qmodel,
            data,
            awq_on=pipeline["awq"],
            clip_on=pipeline["clip_search"],
            gptq_on=pipeline["rounding"] == "gptq",
            progress=progress,
            refit_on=pipeline["scale_refit"],
        )
        summary.notes.extend(notes)
        pipeline["decoder"] = record
        steps += [
            label
            for label, on in (
                ("AWQ scaling", pipeline["awq"]),
                ("clipping search by output error", pipeline["clip_search"]),
                ("gptq weight rounding", pipeline["rounding"] == "gptq"),
                ("scale refit to the codes by output error", pipeline["scale_refit"]),
            )
            if on
        ]
    elif pipeline["rounding"] != "nearest" or pipeline["bias_correction"]:
        data = collect(batches, num_samples, summary.notes)
        used = sum(batch_size(b) for b in data)
        # Bias correction over every position, padding included: on all-MiniLM-L6-v2 INT4 g128
        # that held-out mean cosine is 0.9835 against 0.9813 over real tokens only (static W8A8
        # goes the other way, 0.99853 against 0.99806: BENCHMARKS.md, issue 10).
        steps += apply_refinement(qmodel, data, pipeline, summary, progress, real_tokens_only=False)
    if block_int8_rule(recipe, qmodel, pipeline):
        where = "lm_head" if pipeline["block_int8_inputs"] == "lm_head" else "Linear"
        steps.append(f"{where} int8 inputs per token and block (MatMulNBits accuracy_level=4)")
    if calib_data is None:
        summary.notes.extend(pipeline_notes(pipeline))
    attach_ptq_info(
        qmodel, summary, "weight_only", recipe, {**pipeline, "equalize": False}, steps, used
    )
    return qmodel


def _build_without_data(
    model: nn.Module, recipe: Recipe
) -> tuple[nn.Module, Summary, Recipe, dict[str, Any]]:
    """The weight-only model built with no batch to run: registration order stands for
    execution order, no BatchNorm is folded (the summary says both), the data steps are off."""
    qmodel, summary, recipe = build_weight_only(model, recipe, None)
    pipeline = resolve_pipeline(recipe, qmodel, has_data=False)
    if recipe.first_last_bits is not None:
        summary.notes.append(
            f"no calib_data: the layers kept at {recipe.first_last_bits} bits are the first "
            "and last the model registers (no run shows the order they execute in)"
        )
    if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()):
        summary.notes.append(
            "no calib_data: BatchNorm not folded (a run finds which layer feeds which)"
        )
    return qmodel, summary, recipe, pipeline
