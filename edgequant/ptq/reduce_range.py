"""7-bit weights for the 8-bit layers that meet 8-bit unsigned activations, where learned rounding
makes the lost bit cost nothing: ONNX Runtime's fast integer kernel then runs them exactly on
every x86 CPU.

ONNX Runtime runs an 8-bit layer between uint8 activations with a u8s8 kernel. On x86 CPUs
without VNNI it multiplies with VPMADDUBSW, which sums each pair of uint8 x int8 products in int16
and saturates unless |weight| <= 64 (255 x 64 x 2 < 32767). The exporter therefore stores 8-bit
weights as UINT8 + 128 (export/int8_kernels.py: the u8u8 kernel, exact and slower). Weights on a
7-bit grid stay INT8 and run the fast kernel exactly: ONNX Runtime's own `reduce_range`, which
rounds to nearest. Here each candidate layer gets its 7-bit weights by GPTQ (Frantar et al. 2023,
ptq/gptq.py) and keeps them where the layer's quantized output error against the float layer on
float inputs, ||Q(W) X_q - W X||^2 (X_q: its quantized inputs), measured on calibration batches
that the rounding did not see, grows by at most TOLERANCE over the 8-bit weights the pipeline
would give it. The input's own quantization error is part of that error, so a layer whose
inputs are coarser than its weights loses nothing measurable at 7 bits.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from edgequant.modules import QuantMixin, fast_simulation
from edgequant.ptq.calibrate import capture_inputs
from edgequant.ptq.gptq import gptq_hessian, gptq_weight
from edgequant.ptq.rounding import as_columns, layer_input, supports, weight_grid
from edgequant.quantizer import TensorQuantizer, quantizers
from edgequant.spec import QuantSpec

REDUCED_BITS = 7


def candidate(layer: QuantMixin) -> bool:
    """An 8-bit signed weight grid read by an 8-bit unsigned activation quantizer with fixed
    parameters: the layer ONNX Runtime would run with the u8s8 kernel."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    return (
        wq is not None
        and wq.mode == "quantize"
        and wq.spec.bits == 8
        and wq.spec.signed
        and iq is not None
        and iq.mode == "quantize"
        and iq.spec.bits == 8
        and not iq.spec.signed
    )


# The relative growth of a layer's output error that counts as losing nothing.
TOLERANCE = 0.05


def columns(layer: QuantMixin, inputs: list[Tensor], quantize: bool) -> list[Tensor]:
    """The layer's inputs as (samples, weight columns) matrices, quantized as the layer
    quantizes them or float (transformed only)."""
    with torch.no_grad():
        return [
            as_columns(layer, layer_input(layer, x) if quantize else layer.transform_input(x))
            for x in inputs
        ]


def output_errors(
    weight: Tensor, candidates: list[Tensor], xq: list[Tensor], xf: list[Tensor]
) -> list[float]:
    """||Q X_q - W X_f||^2 summed over samples for each candidate weight Q (float64)."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    qs = [q.detach().reshape(q.shape[0], -1).double() for q in candidates]
    errs = [0.0] * len(qs)
    for cq, cf in zip(xq, xf, strict=True):
        ref = cf.double() @ w.T
        for i, q in enumerate(qs):
            errs[i] += float((cq.double() @ q.T - ref).square().sum())
    return errs


def split_batches(inputs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(fit, score): every fourth calibration sample (counted across batches, so the split does
    not depend on the batching) scores the rounding the others fit, so that GPTQ's fit to its
    own inputs does not count as accuracy. Fewer than two samples serve both."""
    fit, score = [], []
    start = 0
    for x in inputs:
        held = torch.arange(start, start + x.shape[0]) % 4 == 3
        start += x.shape[0]
        if bool(held.any()):
            score.append(x[held])
        if not bool(held.all()):
            fit.append(x[~held])
    if not fit or not score:
        return inputs, inputs
    return fit, score


def _fake_quantized(wq: TensorQuantizer, weight: Tensor) -> Tensor:
    with torch.no_grad():
        return cast(Tensor, wq(weight))


def _set_bits(wq: TensorQuantizer, spec: QuantSpec, weight: Tensor) -> None:
    wq.set_spec(spec)
    wq.calibrate_tensor(weight)
    wq.set_mode("quantize")


def reduce_layer_(
    layer: QuantMixin,
    inputs: list[Tensor],
    float_inputs: list[Tensor],
    rounding: str,
    force: bool,
) -> tuple[bool, float]:
    """Try 7-bit GPTQ weights on one layer; keep them where the output error on held-out
    calibration batches grows by at most TOLERANCE over the pipeline's 8-bit `rounding`
    ("nearest" or "gptq"), or always with `force`; kept weights are then fitted on every batch.
    Returns (kept, the error ratio 7-bit / 8-bit)."""
    wq = layer.weight_quantizer
    assert wq is not None
    weight = layer.weight.detach().clone()
    fit, score = split_batches(inputs)
    _, score_f = split_batches(float_inputs)
    h_fit = cast(Tensor, gptq_hessian(layer, fit))
    eight = (
        gptq_weight(weight, h_fit, *weight_grid(layer))
        if rounding == "gptq"
        else _fake_quantized(wq, weight)
    )
    spec8 = wq.spec
    _set_bits(wq, spec8.replace(bits=REDUCED_BITS), weight)
    grid = weight_grid(layer)
    seven = gptq_weight(weight, h_fit, *grid)
    err8, err7 = output_errors(
        weight, [eight, seven], columns(layer, score, True), columns(layer, score_f, False)
    )
    ratio = err7 / err8 if err8 > 0 else float("inf")
    if force or ratio <= 1 + TOLERANCE:
        if len(inputs) > 1:
            seven = gptq_weight(weight, cast(Tensor, gptq_hessian(layer, inputs)), *grid)
        with torch.no_grad():
            layer.weight.copy_(seven)
        return True, ratio
    _set_bits(wq, spec8, weight)
    return False, ratio


def _float_model(qmodel: nn.Module) -> nn.Module:
    """A copy of the model with every quantizer off: the float inputs of each layer."""
    reference = copy.deepcopy(qmodel)
    for q in quantizers(reference):
        q.mode = "disabled"
    return reference


def reduce_range_(
    qmodel: nn.Module,
    layers: list[tuple[str, QuantMixin]],
    batches: list[Any],
    rounding: str,
    setting: bool | None,
) -> tuple[dict[str, Any], list[str]]:
    """Recipe.reduce_range on a calibrated model, layer by layer in execution order (`layers`),
    each seeing its inputs as the partly reduced model computes them. Returns the entry for
    quant_info["pipeline"] and the summary's notes."""
    names = [n for n, m in layers if candidate(m)]
    if setting is False or not names:
        why = "off in the recipe" if setting is False else "no 8-bit layer reads uint8 inputs"
        return {"reduce_range": {"layers": [], "why": why}}, []
    if rounding not in ("nearest", "gptq"):
        why = (
            f"not compared with {rounding} rounding: {len(names)} layers keep 8 bits (UINT8 "
            "in the ONNX file, the exact u8u8 kernel)"
        )
        return {"reduce_range": {"layers": [], "why": why}}, [f"reduce_range: {why}"]
    reference = _float_model(qmodel)
    kept: list[str] = []
    ratios: dict[str, float] = {}
    notes: list[str] = []
    with fast_simulation(qmodel):
        for name in names:
            layer = cast(QuantMixin, qmodel.get_submodule(name))
            why_not = supports(layer)
            if why_not is not None:
                notes.append(f"reduce_range: {name} keeps 8 bits ({why_not}: no GPTQ)")
                continue
            inputs = capture_inputs(qmodel, layer, batches)
            float_inputs = capture_inputs(reference, reference.get_submodule(name), batches)
            ok, ratios[name] = reduce_layer_(layer, inputs, float_inputs, rounding, bool(setting))
            if ok:
                kept.append(name)
    notes.append(
        f"reduce_range: {len(kept)} of {len(names)} 8-bit layers with uint8 inputs take 7-bit "
        "GPTQ weights (INT8 within +-64 in the ONNX file: the fast u8s8 kernel, exact on every "
        "CPU)" + ("" if setting else "; the others lose output accuracy at 7 bits and keep 8")
    )
    entry = {
        "layers": kept,
        "output_error_ratio_7_to_8": {n: round(r, 3) for n, r in ratios.items()},
        "why": "recipe: every candidate layer"
        if setting
        else f"output error of 7-bit GPTQ <= {1 + TOLERANCE:g}x that of the 8-bit {rounding} "
        "weights, on calibration batches the rounding did not see",
    }
    return {"reduce_range": entry}, notes
