"""Lowering, the base of every exporter: a quantized model as modules that call edgequant's
export ops (export/ops.py) on stored integers. Each quantized layer becomes a LoweredLayer
(integer weights, INT32 bias, scales), each activation quantizer a LoweredQDQ, each quantized
embedding a LoweredEmbedding; nothing here knows a file format (export/onnx.py traces the
lowered model, export/pt2e.py replaces its modules with its own).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.export import ops  # noqa: F401  (registers torch.ops.edgequant)
from edgequant.export.int8_kernels import WEIGHT_STORAGE as WEIGHT_STORAGE
from edgequant.export.int8_kernels import as_uint8, can_saturate, resolve_weight_storage
from edgequant.instrument import quant_layers
from edgequant.modules import (
    BIAS_QMAX,
    BIAS_QMIN,
    QuantEmbedding,
    QuantLinear,
    QuantMixin,
    split_concat_order,
    transform_input,
)
from edgequant.ort_kernels import PlainAdd, QLinearAddSim
from edgequant.quantizer import TensorQuantizer
from edgequant.targets import TARGETS


class ExportError(RuntimeError):
    """The model could not be exported, or the export did not verify (nothing was written)."""


def _container_bits(bits: int) -> int:
    return 4 if bits <= 4 else 8 if bits <= 8 else 16


def _activation_container_bits(bits: int) -> int:
    """Activations below 4 bits travel in 8-bit containers behind a Clip: ONNX Runtime's
    Clip-QuantizeLinear fusion cannot read a 4-bit zero point and refuses the whole model."""
    return 8 if bits < 4 else _container_bits(bits)


_INT_DTYPES = {
    (4, True): torch.int8,
    (4, False): torch.uint8,
    (8, True): torch.int8,
    (8, False): torch.uint8,
    (16, True): torch.int16,
    (16, False): torch.uint16,
    (32, True): torch.int32,
}


def _natural_range(container: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (container - 1)), 2 ** (container - 1) - 1) if signed else (0, 2**container - 1)


class LoweredQDQ(nn.Module):
    """A calibrated activation quantizer as the export sees it."""

    def __init__(self, q: TensorQuantizer) -> None:
        super().__init__()
        spec = q.spec
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.container = _activation_container_bits(spec.bits)
        self.axis = -1 if spec.per_tensor else spec.axis
        if spec.granularity == "group":
            raise ExportError(f"{q.name}: per-group activation quantization has no ONNX QDQ form")
        dtype = _INT_DTYPES[(self.container, spec.signed)]
        self.register_buffer("scale", q.scale.detach().clone().float())
        self.register_buffer("zero_point", q.zero_point.detach().to(dtype))
        self.clip = (self.qmin, self.qmax) != _natural_range(self.container, spec.signed)
        zp = q.zero_point.float()
        self.register_buffer("clip_lo", ((self.qmin - zp) * q.scale).float().min().reshape(()))
        self.register_buffer("clip_hi", ((self.qmax - zp) * q.scale).float().max().reshape(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.edgequant.qdq(
            x,
            self.scale,
            self.zero_point,
            self.clip_lo,
            self.clip_hi,
            self.qmin,
            self.qmax,
            self.axis,
            self.container,
            self.clip,
        )


def _stored_weight(layer: QuantMixin) -> tuple[Tensor, Tensor, Tensor, int, int, int]:
    """(integers, scale, zero point, axis, block size, container bits) of a layer's weight."""
    wq = layer.weight_quantizer
    assert wq is not None
    spec = wq.spec
    axis = None if spec.per_tensor else spec.axis
    q = F.quantize(
        layer.weight.detach(), wq.scale, wq.zero_point, spec.qmin, spec.qmax, axis, spec.group_size
    )
    container = _container_bits(spec.bits)
    dtype = _INT_DTYPES[(container, spec.signed)]
    return (
        q.to(dtype),
        wq.scale.detach().clone().float(),
        wq.zero_point.detach().to(dtype),
        -1 if axis is None else axis,
        spec.group_size or 0,
        container,
    )


class LoweredLayer(nn.Module):
    """A quantized Conv1d/Conv2d/Linear with integer weights (and INT32 bias) as stored buffers."""

    # Buffers registered in __init__ (which ones depends on the layer), and a method set below.
    input_smooth_inv: Tensor | None
    input_channel_index: Tensor | None
    input_split_tail: Tensor | None
    weight: Tensor
    bias: Tensor
    acc_scale: Tensor
    bias_int: Tensor | None
    _integer_forward: ClassVar[Callable[[LoweredLayer, Tensor], Tensor]]
    u8s8_wide: bool = False  # INT8 weights, |w| > 64, beside uint8 inputs: see _store_weight

    def __init__(
        self, layer: QuantMixin, weight_storage: str = "exact", int8_containers: bool = False
    ) -> None:
        super().__init__()
        self.name = layer.layer_name
        self._set_geometry(layer)
        self._set_input(layer)
        iq, wq = layer.input_quantizer, layer.weight_quantizer
        self.weight_float = wq is None or wq.mode != "quantize"
        if self.weight_float:
            self.register_buffer("weight", layer.weight.detach().clone())
        else:
            self._store_weight(layer, weight_storage, int8_containers)
        # Layers ONNX Runtime has no integer kernel for (4-bit weights or activations) run as a
        # float op on integer-valued tensors, which sums exactly, then one scaling: the same bits
        # as the simulation's integer form (QuantMixin.integer_forward).
        fusable = self._fusable(iq)
        self.integer_pattern = layer.integer_form() and not fusable and not self.dynamic
        if self.integer_pattern:
            self._store_integer_scales(layer)
        self._store_bias(layer)

    def _set_geometry(self, layer: QuantMixin) -> None:
        """The op (linear, conv1d, conv2d) and a convolution's arguments and padding."""
        module: Any = layer
        self.kind = "linear" if isinstance(layer, nn.Linear) else f"conv{module.weight.dim() - 2}d"
        if self.kind != "linear":
            if module.padding_mode != "zeros":
                self.pad: tuple[tuple[int, ...], str] | None = (
                    module._reversed_padding_repeated_twice,
                    module.padding_mode,
                )
                padding: Any = 0
            else:
                self.pad, padding = None, module.padding
            self.conv_args = dict(
                stride=module.stride,
                padding=padding,
                dilation=module.dilation,
                groups=module.groups,
            )

    def _set_input(self, layer: QuantMixin) -> None:
        """The input's quantizer, smoothing and channel order, and whether it is dynamic."""
        iq = layer.input_quantizer
        self.act_mode = iq.mode if iq is not None else "disabled"
        # Named as in the quantized layer: a traced graph may call `<layer>.input_quantizer` itself.
        self.input_quantizer = LoweredQDQ(iq) if iq is not None and iq.mode == "quantize" else None
        self.shared_input = layer.shared_input
        smooth = layer.input_smooth_inv
        self.register_buffer(
            "input_smooth_inv", smooth.detach().clone() if smooth is not None else None
        )
        index = layer.input_channel_index
        self.register_buffer(
            "input_channel_index", index.detach().clone() if index is not None else None
        )
        self.register_buffer("input_split_tail", None)
        self.dynamic = self.act_mode == "dynamic"
        self.per_token = self.dynamic and iq is not None and iq.per_token
        if self.dynamic and not isinstance(layer, QuantLinear):
            raise ExportError(
                f"layer {self.name!r}: dynamic quantization exports Linear layers only"
            )

    def _fusable(self, iq: TensorQuantizer | None) -> bool:
        """8-bit weights and 8-bit activations: a layer ONNX Runtime fuses into an integer kernel."""
        return (
            not self.weight_float
            and self.w_container == 8
            and iq is not None
            and _activation_container_bits(iq.spec.bits) == 8
        )

    def _store_weight(self, layer: QuantMixin, weight_storage: str, int8_containers: bool) -> None:
        """The weight as integers, scale and zero point (uint8 + 128 where int8 could saturate;
        int8_containers: fewer bits than 8 in an 8-bit container, unless grouped)."""
        iq = layer.input_quantizer
        w_q, w_scale, w_zp, self.w_axis, self.w_block, self.w_container = _stored_weight(layer)
        w_q = self._concat_split(w_q)
        if int8_containers and self.w_container < 8 and not self.w_block:
            # Integer runtimes (TFLite Micro / CMSIS-NN, XNNPACK) have no 4-bit conv kernel: the
            # same integers in int8, so the layer is the usual integer pattern.
            self.w_container = 8
        if self.dynamic:
            if self.w_container != 8 or self.w_axis not in (-1, 0):
                raise ExportError(
                    f"layer {self.name!r}: dynamic quantization needs 8-bit per-tensor "
                    "or per-output-channel weights"
                )
            if bool((w_zp != 0).any()):
                raise ExportError(
                    f"layer {self.name!r}: dynamic quantization needs symmetric weights"
                )
            w_q = w_q.t().contiguous()
        unsigned_input = self.dynamic or (
            self._fusable(iq) and iq is not None and not iq.spec.signed and iq.mode == "quantize"
        )
        # INT8 weights that ONNX Runtime's u8s8 kernel could saturate on x86 without VNNI.
        wide = unsigned_input and w_q.dtype == torch.int8 and can_saturate(w_q)
        if wide and weight_storage == "exact":
            w_q, w_zp = as_uint8(w_q), as_uint8(w_zp)
        self.u8s8_wide = wide and weight_storage != "exact"
        self.w_zero = not bool((w_zp != 0).any())
        self.register_buffer("weight_q", w_q)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("weight_zero_point", w_zp)

    def _concat_split(self, w_q: Tensor) -> Tensor:
        """An outlier-split input gathered as x and its repeated channels concatenated (a Gather
        of every channel along the last axis is slow in ONNX Runtime): the channel index, the
        smoothing factors and the integer weight's columns reordered alike, which changes no
        integer sum. Only where the input is quantized per tensor (or per token) and the weight
        is not grouped along the input."""
        index = self.input_channel_index
        iq = self.input_quantizer
        per_tensor = iq is not None and cast(Tensor, iq.scale).numel() == 1
        quantized = self.dynamic or per_tensor
        if index is None or self.kind != "linear" or self.w_block or not quantized:
            return w_q
        order = split_concat_order(index)
        if order is None:
            return w_q
        channels = int(index.max()) + 1
        self.input_channel_index = index[order]
        self.input_split_tail = index[order][channels:].clone()
        if self.input_smooth_inv is not None:
            self.input_smooth_inv = self.input_smooth_inv[order].clone()
        return w_q[:, order].contiguous()

    def _store_integer_scales(self, layer: QuantMixin) -> None:
        """The accumulator's scale and the INT32 bias of the integer pattern."""
        iq, wq = layer.input_quantizer, layer.weight_quantizer
        assert iq is not None and wq is not None
        acc_scale = (iq.scale.reshape(()) * wq.scale).float()
        shape = [1] * (2 if self.kind == "linear" else int(self.kind[4]) + 2)
        shape[-1 if self.kind == "linear" else 1] = -1
        self.register_buffer("one", torch.tensor(1.0))
        self.register_buffer("acc_scale", acc_scale.reshape(shape))
        self.register_buffer(
            "bias_int",
            layer.integer_bias(acc_scale).reshape(shape) if layer.bias is not None else None,
        )

    def _store_bias(self, layer: QuantMixin) -> None:
        """The bias as INT32 with its scale, or as float where it has no scale."""
        bias = layer.bias
        bias_scale = layer.bias_scale()
        self.has_bias = bias is not None
        self.bias_quantized = bias is not None and bias_scale is not None
        if bias is not None and bias_scale is not None:
            b_axis = None if bias_scale.numel() == 1 else 0
            zp = torch.zeros(bias_scale.shape, dtype=torch.int32)
            self.register_buffer(
                "bias_q", F.quantize(bias.detach(), bias_scale, zp, BIAS_QMIN, BIAS_QMAX, b_axis)
            )
            self.register_buffer(
                "bias_scale", bias_scale.detach().clone().reshape(bias_scale.shape)
            )
            self.register_buffer("bias_zero_point", zp)
            self.b_axis = -1 if b_axis is None else 0
        else:
            self.register_buffer(
                "bias", bias.detach().clone() if bias is not None else torch.zeros(0)
            )

    def forward(self, x: Tensor) -> Tensor:
        x = transform_input(
            x, self.input_channel_index, self.input_smooth_inv, self.input_split_tail
        )
        if self.dynamic:
            return torch.ops.edgequant.dynamic_linear(
                x,
                self.weight_q,
                self.weight_zero_point,
                self.weight_scale,
                self.bias,
                self.has_bias,
                self.per_token,
            )
        if self.integer_pattern:
            return self._integer_forward(x)
        if self.input_quantizer is not None and not self.shared_input:
            x = self.input_quantizer(x)
        w = (
            self.weight
            if self.weight_float
            else torch.ops.edgequant.dq(
                self.weight_q,
                self.weight_scale,
                self.weight_zero_point,
                self.w_axis,
                self.w_block,
                self.w_container,
                self.w_zero,
            )
        )
        b: Tensor | None
        if self.bias_quantized:
            b = torch.ops.edgequant.dq(
                self.bias_q, self.bias_scale, self.bias_zero_point, self.b_axis, 0, 32, True
            )
        else:
            b = self.bias if self.has_bias else None
        if self.kind == "linear":
            if (
                self.input_quantizer is None
                and not self.weight_float
                and self.w_container == 8
                and x.dim() > 2
            ):
                # Float activations times 8-bit weights on a 3-D input export as MatMul, which
                # ONNX Runtime fuses with the weight's DequantizeLinear into MatMulNBits; that
                # kernel quantizes the activations to int8 itself (its default accuracy level
                # 4), so the deployed model is not the simulated one (46 dB instead of 136 dB
                # on a small attention model). Gemm on the 2-D view computes the same. (4-bit
                # weights keep MatMulNBits, the fast kernel for language models.)
                y = torch_F.linear(x.reshape(-1, x.shape[-1]), w, b)
                return y.reshape(*x.shape[:-1], y.shape[-1])
            return torch_F.linear(x, w, b)
        if self.pad is not None:
            x = torch_F.pad(x, self.pad[0], mode=self.pad[1])
        conv = torch_F.conv1d if self.kind == "conv1d" else torch_F.conv2d
        return conv(x, w, b, **self.conv_args)


def _integer_forward_impl(self: LoweredLayer, x: Tensor) -> Tensor:
    iq = self.input_quantizer
    assert iq is not None
    x_int = torch.ops.edgequant.quantize_int(
        x,
        iq.scale,
        iq.zero_point,
        self.one,
        iq.clip_lo,
        iq.clip_hi,
        iq.qmin,
        iq.qmax,
        iq.container,
        iq.clip,
    )
    w_int = torch.ops.edgequant.dq(
        self.weight_q, self.one, self.weight_zero_point, -1, 0, self.w_container, True
    )
    if self.kind == "linear":
        acc = torch_F.linear(x_int, w_int)
    else:
        if self.pad is not None:
            x_int = torch_F.pad(x_int, self.pad[0], mode=self.pad[1])
        conv = torch_F.conv1d if self.kind == "conv1d" else torch_F.conv2d
        acc = conv(x_int, w_int, None, **self.conv_args)
    y = acc * self.acc_scale
    return y + self.bias_int if self.bias_int is not None else y


LoweredLayer._integer_forward = _integer_forward_impl


class LoweredEmbedding(nn.Module):
    """An embedding table stored as integers: gather the rows, then scale them.

    Gather on the integer table, then a multiply by the gathered row scales: the runtime touches
    only the rows it needs (a DequantizeLinear of the whole table would dequantize every row on
    every call), and q * scale is the same float32 product the simulation computes.
    """

    weight_q: Tensor
    row_scale: Tensor

    def __init__(self, layer: QuantMixin) -> None:
        super().__init__()
        module: Any = layer
        wq = layer.weight_quantizer
        if module.max_norm is not None:
            raise ExportError(
                f"layer {layer.layer_name!r}: embeddings with max_norm cannot be exported"
            )
        assert wq is not None
        spec = wq.spec
        if not (spec.per_tensor or (spec.granularity == "channel" and spec.axis == 0)) or bool(
            (wq.zero_point != 0).any()
        ):
            raise ExportError(
                f"layer {layer.layer_name!r}: embedding tables export with symmetric per-row or "
                "per-tensor weights only"
            )
        q = F.quantize(
            layer.weight.detach(), wq.scale, wq.zero_point, spec.qmin, spec.qmax, wq.axis
        )
        # 8-bit containers (ONNX Gather has no INT4 data); per-row scales broadcast over the row.
        self.register_buffer("weight_q", q.to(torch.int8 if spec.bits <= 8 else torch.int16))
        scale = wq.scale.detach().float()
        rows = layer.weight.shape[0]
        self.register_buffer(
            "row_scale",
            (scale if scale.numel() > 1 else scale.expand(rows)).reshape(rows, 1).clone(),
        )

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = torch.index_select(self.weight_q, 0, flat).float() * torch.index_select(
            self.row_scale, 0, flat
        )
        return rows.reshape(ids.shape + (self.weight_q.shape[1],))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per missing torchvision op and torch warns about its own pytree
    API: nothing a user can act on."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lower(qmodel: nn.Module, weight_storage: str = "exact") -> nn.Module:
    """A copy of qmodel whose quantized layers call the export ops on stored integers.

    weight_storage "exact" stores 8-bit weights that meet uint8 activations as uint8 + 128 where
    int8 could saturate ONNX Runtime's u8s8 kernel (as_uint8); "int8" keeps every one int8
    (such layers set u8s8_wide); "auto" is either, by this CPU (resolve_weight_storage).
    For a fully integer target (mcu-int8), weights of fewer bits are stored in 8-bit containers
    (per-tensor or per-channel): the graph stays integer from input to output.
    """
    weight_storage = resolve_weight_storage(weight_storage)  # ValueError for an unknown one
    target = TARGETS.get(str(getattr(getattr(qmodel, "quant_summary", None), "target", "")))
    int8_containers = target is not None and target.fully_integer
    with quiet_exporter():  # deep-copying a traced GraphModule trips torch's pytree deprecation
        lowered = copy.deepcopy(qmodel).eval()
    for name, layer in list(quant_layers(lowered)):
        if isinstance(layer, QuantEmbedding):
            if layer.weight_quantizer is not None and layer.weight_quantizer.mode == "quantize":
                set_submodule(lowered, name, LoweredEmbedding(layer))
            continue
        set_submodule(
            lowered,
            name,
            LoweredLayer(layer, weight_storage, int8_containers),  # type: ignore[arg-type]
        )
    for name, m in list(lowered.named_modules()):
        if isinstance(m, QLinearAddSim):  # the runtime fuses the Add of two DQ outputs itself
            set_submodule(lowered, name, PlainAdd())
        elif isinstance(m, TensorQuantizer):
            if m.mode == "quantize" and m.role == "activation":
                set_submodule(lowered, name, LoweredQDQ(m))
            elif m.mode in ("observe", "dynamic"):
                raise ExportError(
                    f"quantizer {m.name!r} is in mode {m.mode!r}; calibrate the model before export"
                )
    return lowered
