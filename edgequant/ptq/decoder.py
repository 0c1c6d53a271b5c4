"""Weight-only PTQ of a decoder stack (a causal LM), one transformer block at a time.

The layer-by-layer refinement of ptq/static.py runs the whole model up to each layer to capture
its inputs: for a 30-block LM that is hundreds of full passes. Here, as GPTQ's and AWQ's own code
do, the inputs of the first block are captured once; then for each block: one pass with float
weights collects each Linear's input statistics (H = X^T X and mean |x|, accumulated over every
calibration token), AWQ scaling (ptq/awq.py), the clipping search (ptq/clip_search.py) and GPTQ
rounding (Frantar et al. 2022) run from those statistics alone, and one pass with the quantized
block gives the next block's inputs (so later blocks see the error of earlier ones).

AWQ's factors are folded into what produces the Linears' input: a norm's weight (and bias), or
the rows of the Linear before when its outputs map one to one onto the inputs (FOLD_PAIRS: the
gated MLP's up_proj -> down_proj, v_proj -> o_proj without grouped-query attention). A Linear
with no such producer keeps its input unscaled. After folding, the float block must compute what
it computed before (checked on the first batch; otherwise the scaling is undone and noted).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from edgequant.batches import call_model
from edgequant.modules import QuantLinear, QuantMixin
from edgequant.ptq import awq, clip_search
from edgequant.ptq.calibrate import check_context
from edgequant.ptq.gptq import gptq_weight
from edgequant.ptq.scale_refit import refit_scales

# (producer, consumer) Linear names inside one block whose producer output feeds the consumer's
# input channel for channel, up to an elementwise multiply by something else (gated MLP).
FOLD_PAIRS = (("up_proj", "down_proj"), ("v_proj", "o_proj"))
# Relative change of the float block's output that folding may cause (float rounding only).
FOLD_TOLERANCE = 1e-3
# GPTQ's settings in this pipeline: damping (a fraction of H's mean diagonal), columns in order
# of decreasing H diagonal (act-order), lazy-update block size.
GPTQ_DAMP = 0.01
GPTQ_ACT_ORDER = True
GPTQ_BLOCK_SIZE = 128


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of repeated blocks: the ModuleList (>= 2 children of one type, each
    holding quantized Linears) with the most quantized Linears; None when there is none."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(c) for c in module}) != 1:
            continue
        counts = [sum(isinstance(m, QuantLinear) for m in c.modules()) for c in module]
        if min(counts) == 0:
            continue
        if best is None or sum(counts) > best[0]:
            best = (sum(counts), name, module)
    return None if best is None else (best[1], best[2])


def is_decoder_stack(model: nn.Module) -> bool:
    """Most of the model's quantized Linears sit in one stack of repeated blocks."""
    found = find_blocks(model)
    if found is None:
        return False
    inside = sum(isinstance(m, QuantLinear) for m in found[1].modules())
    total = sum(isinstance(m, QuantLinear) for m in model.modules())
    return inside >= 0.5 * total and len(found[1]) >= 2


@dataclass
class _Stats:
    h: Tensor
    abs_sum: Tensor
    count: int = 0

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.h += (rows.T @ rows).double()
        self.abs_sum += rows.abs().sum(dim=0).double()
        self.count += rows.shape[0]


@dataclass
class BlockReport:
    """What happened in one block, for quant_info."""

    alphas: dict[str, float] = field(default_factory=dict)
    awq_gain: dict[str, float] = field(default_factory=dict)
    clip_mean_ratio: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _capture_first_block(
    model: nn.Module, block: nn.Module, batches: list[Any]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        # Each block is re-run several times: no key/value cache may accumulate.
        for key in ("past_key_values", "past_key_value"):
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                with contextlib.suppress(_Stop):
                    call_model(model, batch, index)
    finally:
        handle.remove()
    return captured


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    if args:
        return cast(Tensor, args[0])
    return cast(Tensor, kwargs["hidden_states"])


def _with_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    out = block(*args, **kwargs)
    return cast(Tensor, out[0] if isinstance(out, (tuple, list)) else out)


def _set_weight_modes(layers: list[tuple[str, QuantMixin]], mode: str) -> None:
    for _, layer in layers:
        assert layer.weight_quantizer is not None
        layer.weight_quantizer.mode = mode


def _collect_stats(
    block: nn.Module,
    layers: list[tuple[str, QuantMixin]],
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
) -> tuple[dict[str, _Stats], dict[str, str], dict[str, str], list[Tensor]]:
    """One pass with float weights: each Linear's input statistics (shared between Linears that
    read the same tensor: `owner` maps a layer to the one holding its stats), the module whose
    output each Linear reads (`producer`, by identity, first batch), and the block's outputs."""
    stats: dict[str, _Stats] = {}
    owner: dict[str, str] = {}
    producer: dict[str, str] = {}
    seen: list[tuple[Tensor, str]] = []
    outputs_of: list[tuple[Tensor, str]] = []
    first = [True]

    def pre(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            for t, who in seen:
                if t is x:
                    owner[name] = who
                    return
            seen.append((x, name))
            owner[name] = name
            if name not in stats:
                n = x.shape[-1]
                stats[name] = _Stats(
                    torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
                )
            stats[name].add(x)
            if first[0]:
                for t, who in outputs_of:
                    if t is x:
                        producer[name] = who

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if first[0] and isinstance(out, Tensor):
                outputs_of.append((out, name))

        return hook

    handles = [layer.register_forward_pre_hook(pre(n)) for n, layer in layers]
    handles += [m.register_forward_hook(post(n)) for n, m in block.named_modules() if n]
    outs: list[Tensor] = []
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                seen.clear()
                outs.append(_run(block, args, kwargs))
                first[0] = False
                outputs_of.clear()
    finally:
        for handle in handles:
            handle.remove()
    return stats, owner, producer, outs


def _scale_h(h: Tensor, s: Tensor) -> Tensor:
    inv = (1.0 / s.double()).unsqueeze(0)
    return h * inv.T * inv


def _apply_awq(
    block: nn.Module,
    layers: dict[str, QuantMixin],
    stats: dict[str, _Stats],
    owner: dict[str, str],
    producer: dict[str, str],
    report: BlockReport,
) -> None:
    """Search and fold AWQ factors for each input shared by Linears with a foldable producer;
    the statistics are rescaled in place to the scaled inputs."""
    groups: dict[str, list[str]] = {}
    for name, key in owner.items():
        groups.setdefault(key, []).append(name)
    named = dict(block.named_modules())
    # Linear producers first: folding into up_proj rows must precede up_proj's own search.
    plans: list[tuple[str, list[str], nn.Module, str]] = []
    for key, members in groups.items():
        short = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        for prod_short, cons_short in FOLD_PAIRS:
            prod_name = f"{parent}.{prod_short}" if parent else prod_short
            if short == cons_short and len(members) == 1 and prod_name in layers:
                prod: nn.Module = layers[prod_name]
                if cast(nn.Linear, prod).out_features == cast(nn.Linear, layers[key]).in_features:
                    plans.insert(0, (key, members, prod, "linear"))
                break
        else:
            pname = producer.get(key)
            pmod = named.get(pname) if pname else None
            weight = getattr(pmod, "weight", None) if pmod is not None else None
            if (
                pmod is not None
                and not isinstance(pmod, nn.Linear)
                and isinstance(weight, Tensor)
                and weight.dim() == 1
                and weight.numel() == stats[key].h.shape[0]
            ):
                plans.append((key, members, pmod, "norm"))
    for key, members, prod, kind in plans:
        st = stats[key]
        specs = [layers[m].weight_quantizer.spec for m in members]  # type: ignore[union-attr]
        weights = [layers[m].weight.detach() for m in members]
        hf = (st.h / max(st.count, 1)).float()
        s, alpha, plain, err = awq.search_scales(weights, specs, hf, st.abs_sum / max(st.count, 1))
        report.alphas[key] = alpha
        report.awq_gain[key] = err / plain if plain > 0 else 1.0
        if alpha == 0:
            continue
        with torch.no_grad():
            for m in members:
                layers[m].weight.mul_(s.to(layers[m].weight.dtype).unsqueeze(0))
            # A Linear producer's rows, or a norm's elementwise weight (and bias).
            pw = cast(Tensor, prod.weight)
            pw.div_(s.to(pw.dtype).unsqueeze(1) if kind == "linear" else s.to(pw.dtype))
            bias = getattr(prod, "bias", None)
            if isinstance(bias, Tensor):
                bias.div_(s.to(bias.dtype))
        st.h = _scale_h(st.h, s)
        st.abs_sum = st.abs_sum / s.double()


def _recalibrate(layer: QuantMixin) -> None:
    wq = layer.weight_quantizer
    assert wq is not None
    wq.observer = type(wq.observer)(wq.spec)
    wq.calibrate_tensor(layer.weight)
    wq.set_mode("quantize")


def quantize_blocks_(
    qmodel: nn.Module,
    batches: list[Any],
    awq_on: bool,
    clip_on: bool,
    gptq_on: bool,
    progress: bool = False,
    refit_on: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """Run the block-by-block pipeline in place on `qmodel` (weight quantizers calibrated).
    Returns (notes for the summary, a record for quant_info)."""
    found = find_blocks(qmodel)
    if found is None:
        raise ValueError("the model has no stack of repeated blocks holding quantized Linears")
    stack_name, blocks = found
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        check_context(qmodel, batch, f"calib_data item {index}")
    inputs = _capture_first_block(qmodel, blocks[0], batches)
    if len(inputs) != len(batches):
        raise RuntimeError(f"{stack_name}.0 ran on {len(inputs)} of {len(batches)} batches")
    notes: list[str] = []
    record: dict[str, Any] = {"stack": stack_name, "blocks": len(blocks), "awq_alpha": {}}
    clip_ratios: list[float] = []
    gains: list[float] = []
    for index, block in enumerate(
        tqdm(blocks, desc="blocks (awq/clip/gptq)", disable=not progress, leave=False)
    ):
        prefix = f"{stack_name}.{index}"
        layer_list = [
            (n, cast(QuantMixin, m))
            for n, m in block.named_modules()
            if isinstance(m, QuantLinear)
            and m.weight_quantizer is not None
            and m.weight_quantizer.mode == "quantize"
        ]
        layers = dict(layer_list)
        _set_weight_modes(layer_list, "disabled")
        stats, owner, producer, float_out = _collect_stats(block, layer_list, inputs)
        report = BlockReport()
        if awq_on:
            saved = {n: p.detach().clone() for n, p in block.named_parameters()}
            _apply_awq(block, layers, stats, owner, producer, report)
            if report.alphas and any(a > 0 for a in report.alphas.values()):
                with torch.no_grad():
                    check = _run(block, *inputs[0])
                change = float((check - float_out[0]).norm() / float_out[0].norm().clamp(min=1e-12))
                if change > FOLD_TOLERANCE:
                    with torch.no_grad():
                        for n, p in block.named_parameters():
                            p.copy_(saved[n])
                    stats, owner, producer, float_out = _collect_stats(block, layer_list, inputs)
                    notes.append(
                        f"AWQ scaling undone in {prefix}: folding changed the float block's "
                        f"output by {change:.2g} (relative)"
                    )
                    report.alphas = {}
            record["awq_alpha"].update({f"{prefix}.{k}": v for k, v in report.alphas.items()})
            gains.extend(report.awq_gain.values())
        _set_weight_modes(layer_list, "quantize")
        for name, layer in layer_list:
            st = stats[owner[name]]
            _clip_and_round(layer, st.h / max(st.count, 1), clip_on, gptq_on, refit_on, clip_ratios)
        with torch.no_grad():
            inputs = [
                _with_hidden(args, kwargs, _run(block, args, kwargs)) for args, kwargs in inputs
            ]
    if gains:
        record["awq_mean_error_ratio"] = sum(gains) / len(gains)
    if clip_ratios:
        record["clip_mean_ratio"] = sum(clip_ratios) / len(clip_ratios)
    record["wall_s"] = time.perf_counter() - start
    return notes, record


def _clip_and_round(
    layer: QuantMixin,
    h: Tensor,
    clip_on: bool,
    gptq_on: bool,
    refit_on: bool,
    clip_ratios: list[float],
) -> None:
    """One Linear of a block, with its input's second moment h: the clipping search (its mean
    ratio appended to clip_ratios) or a plain recalibration, then GPTQ rounding when on, then
    the scale refit (ptq/scale_refit.py) of the codes when on."""
    float_weight = layer.weight.detach().clone()
    if clip_on and clip_search.supports(layer) is None:
        ratios = clip_search.search_clipping(layer, h)
        clip_ratios.append(float(ratios.mean()))
    else:
        _recalibrate(layer)
    if gptq_on:
        wq = layer.weight_quantizer
        assert wq is not None
        scale = _expand(wq.scale, layer.weight, wq.axis, wq.spec.group_size)
        zp = _expand(wq.zero_point.float(), layer.weight, wq.axis, wq.spec.group_size)
        new = gptq_weight(
            layer.weight,
            h,
            scale,
            zp,
            wq.spec.qmin,
            wq.spec.qmax,
            block_size=GPTQ_BLOCK_SIZE,
            damp=GPTQ_DAMP,
            act_order=GPTQ_ACT_ORDER,
        )
        with torch.no_grad():
            layer.weight.copy_(new)
    if refit_on:
        _refit(layer, float_weight, h)


def _refit(layer: QuantMixin, float_weight: Tensor, h: Tensor) -> None:
    """Refit the scales of the layer's current codes (its weight on the grid, or rounded to
    it) against the float weight's output; the weight is rewritten on the new grid."""
    wq = layer.weight_quantizer
    assert wq is not None
    if wq.axis != 0 and not (wq.spec.granularity == "group" and wq.axis == 1):
        return
    w = layer.weight.detach()
    scale = _expand(wq.scale, w, wq.axis, wq.spec.group_size)
    zp = _expand(wq.zero_point.float(), w, wq.axis, wq.spec.group_size)
    codes = torch.clamp(torch.round(w / scale) + zp, wq.spec.qmin, wq.spec.qmax) - zp
    groups = wq.scale.reshape(w.shape[0], -1)
    new = refit_scales(float_weight, codes, groups.float(), h)
    with torch.no_grad():
        wq.scale.copy_(new.reshape(wq.scale.shape).to(wq.scale.dtype))
        layer.weight.copy_((codes * _expand(wq.scale, w, wq.axis, wq.spec.group_size)).to(w.dtype))


def _expand(t: Tensor, w: Tensor, axis: int | None, group_size: int | None) -> Tensor:
    """A quantizer's scale or zero point expanded to the weight's shape."""
    t = t.float()
    if axis is None:
        return t.reshape(()).expand_as(w)
    if group_size is None:
        shape = [1] * w.dim()
        shape[axis] = -1
        return t.reshape(shape).expand_as(w)
    return t.repeat_interleave(group_size, dim=axis).expand_as(w)
