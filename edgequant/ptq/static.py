"""Static PTQ: weights and activations calibrated ahead of time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import fx, nn
from tqdm import tqdm

from edgequant.attention import quantize_attention_
from edgequant.batches import batch_size, call_model, naming_the_batch, removing_hooks
from edgequant.graph_quantizers import place_graph_quantizers
from edgequant.instrument import instrument
from edgequant.modules import QuantMixin, fast_simulation
from edgequant.ort_kernels import fuse_like_onnxruntime
from edgequant.ptq import auto, outliers
from edgequant.ptq.adaround import round_adaround
from edgequant.ptq.bias_correction import correct_bias, float_output_means, token_mask
from edgequant.ptq.brecq import Group, SegmentError, block_plan, reconstruct_group
from edgequant.ptq.calibrate import (
    capture_inputs,
    collect,
    peek,
    run_calibration,
    without_quantizers,
)
from edgequant.ptq.equalize import equalize
from edgequant.ptq.gptq import damping, round_gptq
from edgequant.ptq.outlier_split import describe_split
from edgequant.ptq.outliers import plan_outliers_
from edgequant.ptq.reduce_range import reduce_range_
from edgequant.ptq.rounding import supports as rounding_support
from edgequant.ptq.smoothquant import describe_smoothing
from edgequant.quantizer import quantizers
from edgequant.recipe import Recipe
from edgequant.summary import Summary, attach_info
from edgequant.targets import TARGETS

# The learned rounding methods by Recipe.rounding name ("block" rounds with AdaRound inside
# BRECQ's blocks).
ROUNDERS: dict[str, Callable[..., None]] = {"gptq": round_gptq, "adaround": round_adaround}


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
        qmodel = fuse_like_onnxruntime(place_graph_quantizers(qmodel, summary), summary)
    if recipe.quantize_attention:
        qmodel = quantize_attention_(qmodel, recipe.activation, example_batch, summary)
    else:
        summary.notes.append(
            "attention matmuls (ops of two activations) kept in float: "
            "recipe.quantize_attention is off"
        )
    return qmodel, summary, recipe


def lowest_weight_bits(qmodel: nn.Module) -> int | None:
    bits = [
        cast(QuantMixin, m).weight_quantizer.spec.bits  # type: ignore[union-attr]
        for m in qmodel.modules()
        if isinstance(m, QuantMixin) and m.weight_quantizer is not None
    ]
    return min(bits) if bits else None


def resolve_pipeline(
    recipe: Recipe,
    qmodel: nn.Module,
    outliers: list[str] | None = None,
    has_data: bool = True,
) -> dict[str, Any]:
    """The recipe's "auto" choices made concrete for this model: at <= 4 weight bits (where
    round-to-nearest loses accuracy) learned rounding and bias correction, plain rounding above.
    Learned rounding is GPTQ (one closed-form pass) with 8-bit activations; with 4-bit or lower
    activations, block reconstruction (ptq/brecq.py: slower, and better when the inputs are
    coarse too) where the model is a torch.fx graph, else AdaRound: the choices measured on
    ResNet-20's held-out images (BENCHMARKS.md). The rounding target ("auto"): the layer's
    float weight on its own inputs only where every grid is fine (weights >= 4 bits, activations
    > 4 bits); elsewhere the float model's output of the layer, so that each layer absorbs the
    error its inputs bring (chosen on held-out data, KL to FP32, on all-MiniLM-L6-v2 weight-only
    INT4 and ResNet-20 W2A8-W4A8: benchmarks/notes).

    outliers: the Linear inputs calibration found with outlier channels (ptq/outliers.py). At 8
    weight bits they turn on GPTQ (own target) and bias correction too (all-MiniLM-L6-v2 static
    W8A8: benchmarks/results/static_minilm_refine.json and auto_minilm.json). has_data=False
    (no calib_data): the steps that need data are off, and "reasons" says so; asking for one of
    them explicitly is an error. The returned dict's "reasons" gives each choice's reason."""
    outliers = outliers or []
    weight_bits = lowest_weight_bits(qmodel) or 8
    low = weight_bits <= 4
    act_bits = [
        q.spec.bits for q in quantizers(qmodel) if q.role == "activation" and q.mode != "dynamic"
    ]
    coarse_inputs = bool(act_bits) and min(act_bits) <= 4
    coarse_weights = weight_bits <= 3
    if not has_data:
        return _pipeline_without_data(recipe)
    reasons: dict[str, str] = {}
    rounding, reasons["rounding"] = _auto_rounding(
        recipe, qmodel, weight_bits, coarse_inputs, outliers
    )
    target = recipe.rounding_target
    if target == "auto":
        target = "float" if coarse_inputs or coarse_weights else "quantized"
    damp = None
    if rounding == "gptq":
        damp, reasons["gptq_damp"] = damping(recipe.gptq_damp, target == "float")
    if recipe.bias_correction is not None:
        bias_correction = recipe.bias_correction
        reasons["bias_correction"] = "recipe"
    else:
        bias_correction = low or bool(outliers)
        reasons["bias_correction"] = (
            f"{weight_bits}-bit weights"
            if low
            else f"{len(outliers)} Linear inputs with outlier channels"
            if outliers
            else f"{weight_bits}-bit weights, no Linear input with outliers"
        )
    return {
        "equalize": recipe.equalize if recipe.equalize is not None else False,
        "rounding": rounding,
        "rounding_target": target,
        "gptq_damp": damp,
        "bias_correction": bias_correction,
        "reasons": reasons,
    }


def _float_reference(qmodel: nn.Module, rounding: str, float_target: bool) -> nn.Module | None:
    """The float model (original weights, no quantizer) gives each layer's float inputs, the
    target the rounding reconstructs; for block rounding, the value where each block ends (with
    target "quantized": the float weights' on the quantized activations). None: not needed."""
    if not (rounding == "block" or (rounding != "nearest" and float_target)):
        return None
    return without_quantizers(qmodel) if float_target else without_quantizers(qmodel, ("weight",))


def _round_block(
    qmodel: nn.Module,
    reference: nn.Module | None,
    group: Group,
    stop: str | None,
    batches: list[Any],
    notes: list[str],
) -> list[str]:
    """One block's layers learn their rounding together; returns the layers left to AdaRound
    layer by layer (the graph cannot give the block as one segment), noted in `notes`."""
    try:
        reconstruct_group(
            cast(fx.GraphModule, qmodel), cast(fx.GraphModule, reference), group, stop, batches
        )
    except SegmentError as err:
        notes.append(
            f"block rounding of {', '.join(n for n, _ in group)} not possible ({err}): "
            "AdaRound layer by layer"
        )
        return [n for n, _ in group]
    return []


def _pipeline_without_data(recipe: Recipe) -> dict[str, Any]:
    """No calib_data: the steps that need data are off; asking for one of them is an error."""
    for label, value, off in (
        ("rounding", recipe.rounding, "nearest"),
        ("bias_correction", recipe.bias_correction, False),
        ("equalize", recipe.equalize, False),
    ):
        if value not in ("auto", None, off):
            raise ValueError(
                f"recipe {recipe.name!r}: {label}={value!r} needs calibration data (it "
                f"reads the layers' inputs); pass calib_data or set {label}={off!r}"
            )
    return {
        "equalize": False,
        "rounding": "nearest",
        "rounding_target": "quantized",
        "bias_correction": False,
        "reasons": {
            "rounding": "no calib_data: round to nearest, the rounding that needs none",
            "bias_correction": "no calib_data: off (it needs the layers' outputs)",
        },
    }


def _auto_rounding(
    recipe: Recipe,
    qmodel: nn.Module,
    weight_bits: int,
    coarse_inputs: bool,
    outliers: list[str],
) -> tuple[str, str]:
    """(rounding, why): the recipe's, else by the weight bits, the activation bits and the
    Linear inputs with outlier channels."""
    low = weight_bits <= 4
    if recipe.rounding != "auto":
        return recipe.rounding, "recipe"
    if low and not coarse_inputs:
        return "gptq", f"{weight_bits}-bit weights"
    if low:
        # Coarse inputs: the block's layers learn their rounding together (needs the fx graph),
        # else AdaRound layer by layer.
        rounding = "block" if isinstance(qmodel, fx.GraphModule) else "adaround"
        return rounding, f"{weight_bits}-bit weights, <= 4-bit activations"
    if outliers:
        return "gptq", f"{len(outliers)} Linear inputs with outlier channels"
    return "nearest", f"{weight_bits}-bit weights, no Linear input with outliers"


def execution_order(qmodel: nn.Module, batch: Any) -> list[tuple[str, QuantMixin]]:
    """Quantized layers in the order the model runs them (each once)."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n))
        for name, m in qmodel.named_modules()
        if isinstance(m, QuantMixin)
    ]
    with removing_hooks(handles), torch.no_grad():
        call_model(qmodel, batch)
    seen = list(dict.fromkeys(order))
    return [(n, cast(QuantMixin, qmodel.get_submodule(n))) for n in seen]


def refine_weights(
    qmodel: nn.Module,
    batches: list[Any],
    rounding: str,
    bias_correction: bool,
    progress: bool = False,
    float_target: bool = True,
    real_tokens_only: bool = True,
    gptq_damp: float | None = None,
) -> list[str]:
    """Learned rounding and bias correction, layer by layer in execution order, each layer seeing
    its inputs as the partly refined model computes them. float_target: the rounding reconstructs
    the float model's output of the layer (else the layer's float weight on its own inputs).
    gptq_damp: GPTQ's damping (None: its module default).
    real_tokens_only: bias correction leaves out the positions a tokenizer batch's attention mask
    marks as padding. Returns notes for the summary."""
    if rounding == "block" and not isinstance(qmodel, fx.GraphModule):
        raise ValueError(
            "rounding='block' needs a model torch.fx can trace (block reconstruction cuts the "
            "graph into blocks); use rounding='adaround' for this model"
        )
    notes: list[str] = []
    layers = execution_order(qmodel, batches[0])
    means = (
        float_output_means(
            qmodel, {n: m for n, m in layers if m.bias is not None}, batches, real_tokens_only
        )
        if bias_correction
        else {}
    )
    skipped: dict[str, str] = {}
    masks = [token_mask(b) if real_tokens_only else None for b in batches]
    reference = _float_reference(qmodel, rounding, float_target)
    # rounding="block": each block is rounded as a whole when the run reaches its first layer;
    # a block the graph cannot give as one segment falls back to AdaRound layer by layer.
    blocks: dict[str, tuple[Group, str | None]] = {}
    layerwise: set[str] = set()
    if rounding == "block":
        plan, _ = block_plan(qmodel, layers)
        blocks = {group[0][0]: (group, stop) for group, stop in plan}
    for name, layer in tqdm(
        layers, desc=f"weights ({rounding})", disable=not progress, leave=False
    ):
        if name in blocks:
            layerwise.update(_round_block(qmodel, reference, *blocks[name], batches, notes))
        why = rounding_support(layer) if rounding != "nearest" else "nearest"
        if why is not None and name not in means:
            if rounding != "nearest":
                skipped[name] = why
            continue
        inputs = capture_inputs(qmodel, layer, batches)
        if why is None and (rounding != "block" or name in layerwise):
            targets = (
                capture_inputs(reference, reference.get_submodule(name), batches)
                if reference is not None and float_target
                else None
            )
            damp = {"damp": gptq_damp} if rounding == "gptq" and gptq_damp is not None else {}
            ROUNDERS["adaround" if rounding == "block" else rounding](
                layer, inputs, targets, **damp
            )
        elif why is not None and rounding != "nearest":
            skipped[name] = why
        if name in means:
            correct_bias(layer, inputs, means[name], masks)
    if skipped:
        notes.append(
            f"{rounding} rounding not applied to "
            + "; ".join(f"{n} ({w})" for n, w in skipped.items())
            + ": rounded to nearest"
        )
    return notes


def apply_refinement(
    qmodel: nn.Module,
    data: list[Any],
    pipeline: dict[str, Any],
    summary: Summary,
    progress: bool,
    real_tokens_only: bool = True,
) -> list[str]:
    """refine_weights as the resolved pipeline asks (nothing when it asks for neither step);
    its notes go to the summary, and the steps that ran are returned for quant_info."""
    if pipeline["rounding"] == "nearest" and not pipeline["bias_correction"]:
        return []
    with fast_simulation(qmodel):
        summary.notes.extend(
            refine_weights(
                qmodel,
                data,
                pipeline["rounding"],
                pipeline["bias_correction"],
                progress,
                float_target=pipeline.get("rounding_target", "float") == "float",
                real_tokens_only=real_tokens_only,
                gptq_damp=pipeline.get("gptq_damp"),
            )
        )
    steps = []
    if pipeline["rounding"] != "nearest":
        steps.append(f"{pipeline['rounding']} weight rounding")
    if pipeline["bias_correction"]:
        steps.append("empirical bias correction")
    return steps


def apply_reduce_range(
    qmodel: nn.Module,
    recipe: Recipe,
    data: list[Any],
    pipeline: dict[str, Any],
    summary: Summary,
    progress: bool = False,
) -> list[str]:
    """Recipe.reduce_range (ptq/reduce_range.py) on the calibrated model: records its choice in
    `pipeline` and the summary; returns the step, if it changed any layer."""
    entry, notes = reduce_range_(
        qmodel,
        execution_order(qmodel, data[0]),
        data,
        pipeline["rounding"],
        recipe.reduce_range,
        progress,
    )
    pipeline.update(entry)
    summary.notes.extend(notes)
    kept = entry["reduce_range"]["layers"]
    return [f"7-bit GPTQ weights on {len(kept)} layers (reduce_range)"] if kept else []


def apply_outlier_steps(
    qmodel: nn.Module, recipe: Recipe, data: list[Any], used: int, summary: Summary
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Outlier channel splitting and SmoothQuant as the recipe asks (each "auto": on the Linear
    inputs whose calibration ranges show outlier channels), in place before calibration.
    Returns (entries for quant_info["pipeline"], steps, the layers with outlier inputs); each
    flagged layer gets a line in the summary with its ratio and what was done to it."""
    if TARGETS[recipe.target].fully_integer:
        # SmoothQuant's and splitting's per-channel factors are float ops before the layer: a
        # fully integer graph has none, so "auto" is off there (a number is kept, and refused by
        # the export's integer-graph check).
        off = {f: None for f in ("smooth_alpha", "split_outliers") if getattr(recipe, f) == "auto"}
        recipe = recipe.replace(**off)
        if recipe.smooth_alpha is None and recipe.split_outliers is None:
            return (
                {
                    "outliers": f"not inspected: target {recipe.target} runs a fully integer "
                    "graph, which has no place for SmoothQuant's or splitting's float factors"
                },
                [],
                [],
            )
    if recipe.smooth_alpha is None and recipe.split_outliers is None:
        return {"outliers": "not inspected: smooth_alpha and split_outliers are off"}, [], []
    plan = plan_outliers_(qmodel, data, recipe.smooth_alpha, used, recipe.split_outliers)
    entries: dict[str, Any] = {
        "outlier_ratio_threshold": outliers.OUTLIER_RATIO,
        "outlier_max_fraction": outliers.MAX_OUTLIER_FRACTION,
        "outlier_inputs": {n: round(plan.ratios[n], 1) for n in plan.flagged},
    }
    # Steps are what changed the model: where "auto" found no outliers, none (the inspection's
    # result stays in the entries).
    steps = []
    if plan.flagged:
        steps.append(
            f"outlier inspection: {len(plan.flagged)} of {len(plan.ratios)} Linear inputs have "
            f"a few channels (at most {outliers.MAX_OUTLIER_FRACTION:.0%}) with ranges above "
            f"{outliers.OUTLIER_RATIO:g}x their median channel range"
        )
    summary.notes.extend(plan.reasons())
    if recipe.split_outliers is not None:
        entries["split_channels"] = plan.added
        if recipe.split_outliers != "auto" or plan.flagged:
            steps.append(describe_split(plan.added))
    if recipe.smooth_alpha is not None:
        entries["smooth_alphas"] = plan.alphas
        if recipe.smooth_alpha != "auto" or plan.flagged:
            steps.append(describe_smoothing(plan.alphas))
    return entries, steps, plan.flagged


def pipeline_notes(pipeline: dict[str, Any]) -> list[str]:
    """The summary's lines for the choices the library made (not the recipe)."""
    return [
        f"{step}: {pipeline[step]} ({why})"
        for step, why in pipeline.get("reasons", {}).items()
        if why != "recipe"
    ]


def attach_ptq_info(
    qmodel: nn.Module,
    summary: Summary,
    method: str,
    recipe: Recipe,
    pipeline: dict[str, Any],
    steps: list[str],
    samples_used: int,
) -> None:
    """The quant_info of a model that PTQ built: method, recipe, the pipeline with the steps it
    ran, the samples it read; PTQ reads no labels."""
    info = {
        "method": method,
        "recipe": recipe.to_dict(),
        "pipeline": {**pipeline, "steps": steps},
        "samples_used": samples_used,
        "labels_used": False,
    }
    attach_info(qmodel, summary, info)


def quantize_static(
    model: nn.Module,
    recipe: Recipe,
    calib_data: Iterable[Any] | None,
    num_samples: int,
    progress: bool,
) -> nn.Module:
    if calib_data is None:
        raise ValueError(
            "calib_data is required for method='static': its activation ranges (and the "
            "outlier inspection) are calibrated on it; method='dynamic' and 'weight_only' "
            "(round to nearest) need none"
        )
    first, batches = peek(calib_data)
    with naming_the_batch(first, "calib_data item 0"):
        qmodel, summary, recipe = build_static(model, recipe, first)
    steps: list[str] = []
    data = collect(batches, num_samples, summary.notes)
    used = sum(batch_size(b) for b in data)
    if recipe.equalize:
        pairs = equalize(qmodel)
        steps.append(f"cross-layer equalization ({len(pairs)} pairs)")
        if not pairs:
            summary.notes.append("cross-layer equalization found no layer pairs to equalize")
    outlier_entries, outlier_steps, flagged = apply_outlier_steps(
        qmodel, recipe, data, used, summary
    )
    steps += outlier_steps
    pipeline = {**resolve_pipeline(recipe, qmodel, flagged), **outlier_entries}
    calibrate_weights(qmodel)
    auto.attach_scores(qmodel)
    with fast_simulation(qmodel):
        run_calibration(qmodel, data, used, progress)
    steps.append("weight and activation ranges calibrated")
    picked = auto.choices(qmodel)
    if picked:
        counts = {c: list(picked.values()).count(c) for c in sorted(set(picked.values()))}
        steps.append(
            "auto calibrator picked " + ", ".join(f"{c} for {n}" for c, n in counts.items())
        )
    steps += apply_reduce_range(qmodel, recipe, data, pipeline, summary, progress)
    steps += apply_refinement(qmodel, data, pipeline, summary, progress)
    if flagged:  # the steps the outliers turned on, with their reasons
        summary.notes.extend(pipeline_notes(pipeline))
    attach_ptq_info(qmodel, summary, "static", recipe, pipeline, steps, used)
    return qmodel
