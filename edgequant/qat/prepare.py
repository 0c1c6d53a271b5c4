"""eq.prepare_qat: a PTQ-calibrated model whose quantizers then train.

The model is instrumented by the static PTQ path (ptq.static: the same layers, BN folding and
graph-level quantizers as eq.quantize), its weights and activations calibrated, and each
calibrated quantizer then replaced by its trainable form (recipe.range_learning):

    "lsq"   learned step size with LSQ's gradient scale (lsq.py), weights and activations
    "lsq+"  LSQ, plus a learned zero point for asymmetric activation grids
    "pact"  learned clipping level for activations (pact.py); weights follow their min/max
    "ema"   moving-average activation ranges, weights follow their min/max (ema.py)

BatchNorm: instrumentation folds each BatchNorm into its conv with the BatchNorm's running
(eval) statistics, so the model that trains is the deployed, BN-folded model from the first
step, with the statistics frozen from the start. Jacob et al. 2018 / Krishnamoorthi 2018 fold
with batch statistics first and freeze them later because they train from scratch or for
many epochs; QAT here fine-tunes a trained model for a few epochs, where Krishnamoorthi
(section 3.2, "freeze BN statistics") finds frozen statistics at least as good, and the
folded form costs no BatchNorm in the step at all. What trains is exactly what is exported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from edgequant.batches import naming_the_batch
from edgequant.check import require_target_fits
from edgequant.ptq.calibrate import check_context, collect, peek, run_calibration
from edgequant.ptq.quantize import check_recipe_fits
from edgequant.ptq.static import build_static, calibrate_weights, quantize_static
from edgequant.ptq.weight_only import build_weight_only, is_llama_style, quantize_weight_only
from edgequant.qat.base import QATQuantizer
from edgequant.qat.ema import EMAQuantizer
from edgequant.qat.lsq import LSQQuantizer
from edgequant.qat.pact import PACTQuantizer
from edgequant.quantizer import TensorQuantizer, quantizers
from edgequant.recipe import RANGE_LEARNING, Recipe
from edgequant.summary import Summary, attach_info


def _ema(q: TensorQuantizer) -> QATQuantizer:
    return EMAQuantizer(q)


def _pact(q: TensorQuantizer) -> QATQuantizer:
    if q.role == "weight" or not q.spec.per_tensor:
        return EMAQuantizer(q)
    return PACTQuantizer(q)


def _lsq(q: TensorQuantizer) -> QATQuantizer:
    return LSQQuantizer(q)


def _lsq_plus(q: TensorQuantizer) -> QATQuantizer:
    return LSQQuantizer(q, learn_offset=q.role == "activation")


# recipe.range_learning -> the trainable form of one calibrated quantizer (STYLE §11).
RANGE_LEARNERS: dict[str, Callable[[TensorQuantizer], QATQuantizer]] = {
    "ema": _ema,
    "pact": _pact,
    "lsq": _lsq,
    "lsq+": _lsq_plus,
}
assert set(RANGE_LEARNERS) == set(RANGE_LEARNING)


def _replace_quantizers(model: nn.Module, new_of: dict[TensorQuantizer, nn.Module]) -> None:
    """Swap quantizers by identity: a quantizer shared by several layers (and by a graph node)
    is replaced everywhere by one new module, so it stays shared."""
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):
            if child is not None and child in new_of:
                module._modules[child_name] = new_of[child]


def make_trainable(qmodel: nn.Module, range_learning: str) -> int:
    """Replace every calibrated quantizer of qmodel (in place) by its trainable form; return
    how many were replaced."""
    if range_learning not in RANGE_LEARNERS:
        raise ValueError(
            f"unknown range_learning {range_learning!r}; valid: {', '.join(RANGE_LEARNERS)}"
        )
    factory = RANGE_LEARNERS[range_learning]
    new_of: dict[TensorQuantizer, nn.Module] = {
        q: factory(q)
        for q in quantizers(qmodel)
        if q.mode == "quantize" and not isinstance(q, QATQuantizer)
    }
    _replace_quantizers(qmodel, new_of)
    return len(new_of)


def check_float_model(model: nn.Module, what: str = "model") -> None:
    """Refuse a model that already holds quantizers (eq.quantize's or eq.prepare_qat's output):
    instrumenting it again finds no float layer, and the error would say only that."""
    found = next((n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)), None)
    if found is None:
        return
    info = getattr(model, "quant_info", None)
    method = info.get("method") if isinstance(info, dict) else None
    made_by = " by eq.prepare_qat" if method == "qat" else " by eq.quantize" if method else ""
    raise ValueError(
        f"{what} is already quantized{made_by} (it has the quantizer {found!r}): pass the FP32 "
        "model it was made from"
    )


# prepare_qat(start=...): where the trainable model starts.
STARTS = ("ptq", "calibrated")


def prepare_qat(
    model: nn.Module,
    recipe: Recipe | str = "w8a8",
    calib_data: Iterable[Any] | None = None,
    num_samples: int | None = None,
    progress: bool = False,
    start: str | nn.Module = "ptq",
) -> nn.Module:
    """A copy of `model`, quantized as static PTQ would quantize it, whose quantizers train.

    calib_data: an iterable of model inputs (as for eq.quantize); up to `num_samples`
    (default recipe.calib_samples) calibrate the starting ranges with the recipe's observers.
    start: "ptq" (default) starts from the model eq.quantize(method="static") returns for the
    same recipe, its whole pipeline included (learned rounding and bias correction below 8
    bits), so QAT begins where PTQ ends, and with training switched off it is that PTQ model;
    "calibrated" only calibrates the ranges and rounds the weights to nearest (faster, and
    a worse start below 8 bits); the model eq.quantize returned for this model, recipe and
    calib_data is that PTQ start, not quantized again (a copy trains; _start_from_given).
    SmoothQuant and outlier channel splitting are PTQ steps that a trainable model does not
    carry: they are switched off for the start and the summary says so. Returns an ordinary nn.Module in train mode: train it with any loop, or eq.fit_qat. In
    eval mode it computes what the PTQ model with its current grids computes; export it with
    eq.export_onnx. `model` is not modified.

    A weight-only recipe (no activation spec) starts from eq.quantize(method="weight_only"):
    for a causal LM (a Hugging Face LlamaForCausalLM, calib_data dict batches of token ids) its
    decoder pipeline (AWQ, clipping search, GPTQ); the weights and their learned step sizes
    then train, and the model exports with export_lm_onnx like the PTQ one. The 8-bit token
    table an LM's embedding and lm_head share stays as PTQ made it (its weight and grid frozen),
    so that it stays one table in the file.
    """
    recipe = _check_prepare_args(model, recipe, start, num_samples)
    first = None
    if calib_data is not None:
        first, calib_data = peek(calib_data, "calib_data (one example batch)")
        check_context(model, first, "calib_data item 0")
    # What the target cannot run is refused before any work, as eq.quantize refuses it (QAT's
    # activations are static PTQ's; the first batch gives the shapes).
    require_target_fits(
        model, recipe.target, "weight_only" if recipe.weight_only else "static", first
    )
    skipped = [
        label
        for label, value in (
            ("SmoothQuant (smooth_alpha)", recipe.smooth_alpha),
            ("outlier channel splitting (split_outliers)", recipe.split_outliers),
        )
        if value not in (None, "auto")
    ]
    cap = num_samples or recipe.calib_samples
    qmodel, summary, recipe, used, pipeline, origin = _start(
        model, recipe, calib_data, cap, progress, start
    )
    count = make_trainable(qmodel, recipe.range_learning)
    frozen = freeze_token_table(qmodel)
    if frozen:
        summary.notes.append(frozen)
    if skipped:
        summary.notes.append(
            f"{' and '.join(skipped)}: PTQ steps that prepare_qat does not run; not applied"
        )
    summary.notes.append(
        f"QAT: {count} quantizers trainable ({recipe.range_learning}), starting {origin}, "
        f"ranges calibrated on {used} samples; BatchNorm folded with its running statistics "
        "(frozen)"
    )
    attach_info(
        qmodel,
        summary,
        {
            "method": "qat",
            "recipe": recipe.to_dict(),
            "range_learning": recipe.range_learning,
            "start": start if isinstance(start, str) else "ptq (given)",
            **({"pipeline": pipeline} if pipeline is not None else {}),
            "samples_used": used,
            "labels_used": False,
        },
    )
    return qmodel.train()


def _check_prepare_args(
    model: nn.Module, recipe: Recipe | str, start: str | nn.Module, num_samples: int | None
) -> Recipe:
    """prepare_qat's arguments, each named in its error; a preset name becomes its Recipe."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_float_model(model)
    if isinstance(recipe, str):
        recipe = Recipe.preset(recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(
            f"recipe must be an edgequant.Recipe or a preset name, got {type(recipe).__name__}"
        )
    if recipe.weight is None:
        raise ValueError(f"recipe {recipe.name!r} quantizes no weights: QAT needs weight specs")
    if not isinstance(start, nn.Module) and start not in STARTS:
        raise ValueError(
            f"unknown start {start!r}; valid: {', '.join(STARTS)}, or a model eq.quantize returned"
        )
    check_recipe_fits(model, recipe)
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return recipe


def freeze_token_table(qmodel: nn.Module) -> str:
    """In a LLaMA-style causal LM whose lm_head shares its weight with the embedding, freeze
    that weight and both layers' weight grids (in place): trained apart, the two grids would
    drift and the file would need two tables. Returns a note, or "" when there is nothing to
    freeze."""
    if not is_llama_style(qmodel):
        return ""
    head = qmodel.get_submodule("lm_head")
    embed = qmodel.get_submodule("model.embed_tokens")
    if getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return ""
    cast(nn.Parameter, embed.weight).requires_grad_(False)
    for layer in (head, embed):
        wq = getattr(layer, "weight_quantizer", None)
        for param in wq.parameters() if isinstance(wq, nn.Module) else ():
            param.requires_grad_(False)
    return (
        "QAT: lm_head and model.embed_tokens share one token table: its weight and grid are "
        "frozen (trained apart, the two grids would need two tables in the file)"
    )


_Start = tuple[nn.Module, Summary, Recipe, int, dict[str, Any] | None, str]


def _start(
    model: nn.Module,
    recipe: Recipe,
    calib_data: Iterable[Any] | None,
    cap: int,
    progress: bool,
    start: str | nn.Module,
) -> _Start:
    """The model QAT starts from: (model, summary, recipe, samples used, the PTQ pipeline or
    None, where it started from in words)."""
    if isinstance(start, nn.Module):
        return _start_from_given(recipe, start)
    if start == "ptq":
        return _start_from_ptq(model, recipe, calib_data, cap, progress)
    if recipe.weight_only:
        first = None
        if calib_data is not None:
            first, _ = peek(calib_data, "calib_data (one example batch)")
        with naming_the_batch(first, "calib_data item 0"):
            qmodel, summary, recipe = build_weight_only(model, recipe, first)
        calibrate_weights(qmodel)
        return qmodel, summary, recipe, 0, None, "from calibrated weight grids, rounded to nearest"
    first, batches = peek(calib_data)
    qmodel, summary, recipe = build_static(model, recipe, first)
    calibrate_weights(qmodel)
    used = run_calibration(qmodel, collect(batches, cap, summary.notes), cap, progress)
    return qmodel, summary, recipe, used, None, "from calibrated ranges, weights rounded to nearest"


def _start_from_ptq(
    model: nn.Module, recipe: Recipe, calib_data: Iterable[Any] | None, cap: int, progress: bool
) -> _Start:
    """_start from the PTQ model of the same recipe: weight-only PTQ, or static PTQ without
    SmoothQuant and outlier splitting."""
    if recipe.weight_only:
        kind = "weight-only"
        qmodel = quantize_weight_only(model, recipe, calib_data, cap, progress)
    else:
        kind = "static"
        ptq_recipe = recipe.replace(smooth_alpha=None, split_outliers=None)
        qmodel = quantize_static(model, ptq_recipe, calib_data, cap, progress)
    info = cast("dict[str, Any]", qmodel.quant_info)
    pipeline = info.get("pipeline")
    steps = ", ".join(pipeline.get("steps", [])) if isinstance(pipeline, dict) else ""
    origin = f"from the {kind} PTQ model of the same recipe ({steps})"
    summary = cast(Summary, qmodel.quant_summary)
    return qmodel, summary, recipe, int(info["samples_used"]), pipeline, origin


def _start_from_given(recipe: Recipe, ptq_model: nn.Module) -> _Start:
    """_start from a PTQ model the caller already has (compare passes its PTQ run's): checked
    to be what _start_from_ptq would build (method "weight_only" for a weight-only recipe, else
    "static"; the recipe's grids, first_last_bits and target; no smoothed or split layer), then
    copied."""
    info = getattr(ptq_model, "quant_info", None)
    kind = "weight_only" if recipe.weight_only else "static"
    if not isinstance(info, dict) or info.get("method") != kind:
        got = info.get("method") if isinstance(info, dict) else "not a quantized model"
        raise ValueError(
            f"start: QAT of recipe {recipe.name!r} starts from a {kind} PTQ model "
            f"(eq.quantize(..., method={kind!r})); the given model is {got!r}"
        )
    given = info.get("recipe", {})
    keys = ("weight", "first_last_bits", "target") + (() if recipe.weight_only else ("activation",))
    expected = recipe.to_dict()
    for key in keys:
        if given.get(key) != expected.get(key):
            raise ValueError(
                f"start: the given PTQ model's recipe has {key}={given.get(key)!r}, recipe "
                f"{recipe.name!r} has {expected.get(key)!r}: quantize with the same recipe"
            )
    _refuse_smoothed_or_split(ptq_model)
    pipeline = info.get("pipeline")
    qmodel = copy.deepcopy(ptq_model)
    steps = ", ".join(pipeline.get("steps", [])) if isinstance(pipeline, dict) else ""
    origin = f"from the given {kind.replace('_', '-')} PTQ model of the same recipe ({steps})"
    # A deep copy of a traced model (GraphModule) does not carry plain attributes.
    summary = copy.deepcopy(cast(Summary, ptq_model.quant_summary))
    return qmodel, summary, recipe, int(info.get("samples_used", 0)), pipeline, origin


def _refuse_smoothed_or_split(ptq_model: nn.Module) -> None:
    """ValueError naming the first layer of a PTQ model that is smoothed or has split input
    channels: input transforms a QAT model does not have, so its weights cannot start one."""
    for name, m in ptq_model.named_modules():
        if getattr(m, "input_smooth_inv", None) is not None or (
            getattr(m, "input_channel_index", None) is not None
        ):
            raise ValueError(
                f"layer {name!r} of the PTQ model is smoothed or has split input channels, "
                "which a QAT model does not have: start QAT from a PTQ model quantized without "
                "smooth_alpha and split_outliers"
            )


def start_from(qmodel: nn.Module, ptq_model: nn.Module) -> None:
    """Copy the weights and biases of a PTQ model of the same model and recipe (eq.quantize,
    learned rounding and bias correction included) into a prepared QAT model, in place, with the
    weight grids they were rounded on: PTQ may move a weight grid after calibration (GPTQ's
    clipping search at <= 3 bits), and weights put on one grid and then quantized on another
    lose what the rounding learned (ResNet-20's 2.5-bit plan started QAT at 61.5 % held-out top-1
    instead of 97.4 % before this copied the grids). Activation ranges are calibrated the same
    way in both and stay as prepared."""
    _refuse_smoothed_or_split(ptq_model)
    ptq_weight_quantizers = {q.name: q for q in quantizers(ptq_model) if q.role == "weight"}
    with torch.no_grad():
        own = dict(qmodel.named_parameters())
        for name, value in ptq_model.named_parameters():
            if name in own and own[name].shape == value.shape and not name.endswith("scale"):
                own[name].copy_(value)
        for q in quantizers(qmodel):
            source = ptq_weight_quantizers.get(q.name)
            if q.role != "weight" or source is None or source.scale.shape != q.scale.shape:
                continue
            q.scale.copy_(source.scale)
            q.zero_point.copy_(source.zero_point)
            if isinstance(q, LSQQuantizer):
                q.learned_scale.copy_(source.scale.reshape(q.learned_scale.shape))
                if q.learned_zero_point is not None:
                    q.learned_zero_point.copy_(source.zero_point.float())


def qat_quantizers(model: nn.Module) -> list[QATQuantizer]:
    return [m for m in model.modules() if isinstance(m, QATQuantizer)]


def freeze_observers(model: nn.Module) -> int:
    """Stop the range updates of EMA quantizers (learned ranges keep learning); return how many."""
    frozen = 0
    for q in qat_quantizers(model):
        if isinstance(q, EMAQuantizer) and not q.frozen:
            q.freeze()
            frozen += 1
    return frozen


def finalize(qmodel: nn.Module) -> nn.Module:
    """A copy of a QAT model with plain TensorQuantizers holding the learned grids, in eval
    mode: the PTQ model it has become (eq.export_onnx takes either; this one also saves and
    loads with eq.load). `qmodel` is not modified."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    final = copy.deepcopy(qmodel)
    found = qat_quantizers(final)
    if not found:
        raise ValueError("qmodel has no QAT quantizers: was it made by eq.prepare_qat?")
    final.eval()
    _replace_quantizers(final, {q: q.to_tensor_quantizer() for q in found})
    info = getattr(qmodel, "quant_info", None)
    if isinstance(info, dict):
        final.quant_info = {**info, "finalized": True}  # type: ignore[assignment]
    return final.eval()
