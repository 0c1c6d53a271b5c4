"""The per-layer "auto" calibrator: each activation quantizer whose spec says observer="auto"
picks minmax, percentile, MSE or entropy by the error the pick causes in the outputs of the layers
that read the tensor (observers.AutoObserver does the picking; this module tells it how to score).

A tensor that no quantized layer reads directly (a residual join, a layer output) is scored by
its own quantization error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant.modules import QuantMixin
from edgequant.observers import AutoObserver
from edgequant.quantizer import TensorQuantizer, quantizers


def float_op(layer: QuantMixin, x: Tensor) -> Tensor:
    """The layer's float op on x with its float weight, without bias (bias cancels in errors).

    x is what the layer's input quantizer sees: already split and smoothed by the layer
    (QuantMixin.transform_input), except where the graph quantizes the input before the layer
    (shared_input), whose transform then still applies."""
    if layer.shared_input:
        x = layer.transform_input(x)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return layer._conv_forward(x, layer.weight, None)
    if isinstance(layer, nn.Linear):
        return torch_F.linear(x, layer.weight)
    return x


def readers(model: nn.Module) -> dict[TensorQuantizer, list[QuantMixin]]:
    """For each activation quantizer, the quantized layers whose input it quantizes."""
    out: dict[TensorQuantizer, list[QuantMixin]] = {}
    for m in model.modules():
        if isinstance(m, QuantMixin) and m.input_quantizer is not None:
            out.setdefault(m.input_quantizer, []).append(m)
    return out


def attach_scores(model: nn.Module) -> int:
    """Give every "auto" activation quantizer a score measured in its readers' outputs;
    returns how many quantizers have one."""
    by_quantizer = readers(model)
    count = 0
    for q in quantizers(model):
        if q.role != "activation" or not isinstance(q.observer, AutoObserver):
            continue
        layers = [m for m in by_quantizer.get(q, []) if not isinstance(m, nn.Embedding)]
        if not layers:
            continue

        def score(x: Tensor, xq: Tensor, layers: list[QuantMixin] = layers) -> float:
            with torch.no_grad():
                return sum(
                    float((float_op(m, xq) - float_op(m, x)).double().square().mean())
                    for m in layers
                )

        q.observer.score_fn = score
        count += 1
    return count


def choices(model: nn.Module) -> dict[str, str]:
    """Which candidate each "auto" quantizer picked (after calibration)."""
    return {
        q.name: q.observer.chosen
        for q in quantizers(model)
        if isinstance(q.observer, AutoObserver) and q.observer.chosen is not None
    }
