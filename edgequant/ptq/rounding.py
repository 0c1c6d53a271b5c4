"""What learned rounding of weights shares (GPTQ in ptq/gptq.py, AdaRound in ptq/adaround.py,
BRECQ in ptq/brecq.py): a layer's calibrated weight grid, its inputs as the layer sees them, and
their im2col columns.

Round-to-nearest treats every weight on its own; learned rounding rounds a layer's weights so
that the layer's *output* on calibration inputs stays close to the float output. Every method
keeps the grid the weight quantizer was calibrated with (its scale and zero point) and writes the
result back as the layer's weight, on the grid, so fake quantization, the integer form and the
exported INT4/INT8 initializers all read the same integers. Layers are processed in execution
order, each with its inputs as the partly quantized model computes them (activations quantized,
earlier layers already rounded), so later layers compensate for earlier ones.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.modules import QuantMixin
from edgequant.quantizer import TensorQuantizer


def weight_grid(layer: QuantMixin) -> tuple[Tensor, Tensor, int, int]:
    """Scale and zero point expanded to the weight's shape, and the grid's bounds."""
    wq = layer.weight_quantizer
    assert wq is not None and wq.calibrated
    w = layer.weight
    scale = F.broadcast_param(wq.scale.float(), w, wq.axis, wq.spec.group_size).expand_as(w)
    zp = F.broadcast_param(wq.zero_point.float(), w, wq.axis, wq.spec.group_size).expand_as(w)
    return scale.detach(), zp.detach(), wq.spec.qmin, wq.spec.qmax


def layer_input(layer: QuantMixin, x: Tensor) -> Tensor:
    """What the layer's weight multiplies: x split, smoothed and quantized as the layer does it."""
    x = layer.transform_input(x)
    iq = layer.input_quantizer
    if iq is not None and not layer.shared_input and iq.mode in ("quantize", "dynamic"):
        x = iq(x)
    return x


def as_columns(layer: QuantMixin, x: Tensor) -> Tensor:
    """The layer's input as a (samples, weight columns) matrix: im2col for convolutions."""
    if isinstance(layer, nn.Conv2d):
        cols = torch_F.unfold(
            x,
            cast(tuple[int, int], layer.kernel_size),
            dilation=cast(tuple[int, int], layer.dilation),
            padding=cast(tuple[int, int], layer.padding),
            stride=cast(tuple[int, int], layer.stride),
        )  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(layer, nn.Conv1d):
        cols = torch_F.unfold(
            x.unsqueeze(2),
            (1, layer.kernel_size[0]),
            dilation=(1, layer.dilation[0]),
            padding=(0, cast(tuple[int], layer.padding)[0]),
            stride=(1, layer.stride[0]),
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def supports(layer: QuantMixin) -> str | None:
    """None when learned rounding applies to this layer, else the reason it does not."""
    if layer.weight_quantizer is None or layer.weight_quantizer.mode != "quantize":
        return "weights not quantized"
    if isinstance(layer, nn.Embedding):
        return "an embedding table (no input to reconstruct)"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups})"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return "padding other than explicit zeros"
        return None
    if isinstance(layer, nn.Linear):
        return None
    return f"{type(layer).__name__} layers"


def on_grid(levels: Tensor, zp: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """The weight of `levels` (floor + h, in steps) on the quantizer's grid, clamped to its
    range."""
    return (torch.clamp(levels + zp, qmin, qmax) - zp) * scale


def weight_quantizer(layer: QuantMixin) -> TensorQuantizer:
    assert layer.weight_quantizer is not None
    return layer.weight_quantizer
