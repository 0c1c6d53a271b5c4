"""Export a fake-quantized model as an ONNX QDQ model with integer weights, verified in ONNX Runtime.

Route (DESIGN §4): the quantized layers are lowered to modules that call edgequant's custom ops
(export/ops.py) on *stored integer* weights; the dynamo exporter at opset 21 translates those ops
to QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear + MatMulInteger; a small pass folds
the INT4 casts into packed INT4 initializers; the model is run in ONNX Runtime against the
simulation and only then moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant import functional as F
from edgequant._io import atomic_path
from edgequant.batches import describe_batch, nonfinite, split_inputs
from edgequant.export import ops
from edgequant.instrument import quant_layers
from edgequant.modules import (
    BIAS_QMAX,
    BIAS_QMIN,
    QuantEmbedding,
    QuantLinear,
    QuantMixin,
    transform_input,
)
from edgequant.quantizer import TensorQuantizer

OPSET = 21


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


WEIGHT_STORAGE = ("exact", "int8")
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
NO_SATURATION_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # u8s8 sums in int32


def cpu_int8_flags() -> set[str] | None:
    """Which of the x86 features that decide ONNX Runtime's 8-bit kernels this CPU has (from
    /proc/cpuinfo), or None where that cannot be read (another OS, another architecture)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    if line is None:  # not x86 (Arm lists "Features")
        return None
    flags = set(line.split(":", 1)[-1].split())
    return {f for f in INT8_CPU_FLAGS if f in flags}


def u8s8_saturates_here() -> bool:
    """True when this is an x86 CPU without VNNI, where ONNX Runtime's u8s8 kernel saturates."""
    flags = cpu_int8_flags()
    return flags is not None and not flags & NO_SATURATION_FLAGS


def as_uint8(q: Tensor) -> Tensor:
    """int8 integers (or zero points) as uint8 ones 128 higher: the same dequantized values.

    ONNX Runtime runs an 8-bit layer between uint8 activations (static QDQ after its fusion, or
    DynamicQuantizeLinear + MatMulInteger) in an integer kernel. With int8 weights, on x86 CPUs
    without VNNI (AVX2, AVX-512 before VNNI) that kernel multiplies with VPMADDUBSW, which sums
    each pair of uint8 x int8 products in int16 and saturates (255 x 127 x 2 > 32767), so the
    deployed model quietly differs from the simulation (ONNX Runtime's and OpenVINO's
    "saturation issue"; measured: 27 dB SQNR instead of 147 dB on a small CNN). With uint8
    weights it runs its u8u8 kernel, which widens both to 16 bits first and is exact on every
    CPU, but runs slower (0.69-0.77x on ResNet-20 here, BENCHMARKS.md). Weights within [-64, 64]
    cannot saturate (255 x 64 x 2 < 32767) and stay int8 (can_saturate): 7-bit weights, ONNX
    Runtime's own reduce_range workaround, keep the fast kernel and stay exact.
    """
    return (q.to(torch.int16) + 128).to(torch.uint8)


def can_saturate(q: Tensor) -> bool:
    """Whether stored int8 weights can overflow the int16 pair sums of a u8s8 kernel (VPMADDUBSW:
    a0 * b0 + a1 * b1 with a <= 255): only when some |b| > 64."""
    return bool(q.to(torch.int16).abs().max() > 64) if q.numel() else False


class LoweredLayer(nn.Module):
    """A quantized Conv1d/Conv2d/Linear with integer weights (and INT32 bias) as stored buffers."""

    # Buffers registered in __init__ (which ones depends on the layer), and a method set below.
    input_smooth_inv: Tensor | None
    input_channel_index: Tensor | None
    weight: Tensor
    bias: Tensor
    acc_scale: Tensor
    bias_int: Tensor | None
    _integer_forward: ClassVar[Callable[[LoweredLayer, Tensor], Tensor]]

    def __init__(self, layer: QuantMixin, weight_storage: str = "exact") -> None:
        super().__init__()
        module: Any = layer
        self.name = layer.layer_name
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
        iq, wq = layer.input_quantizer, layer.weight_quantizer
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
        self.dynamic = self.act_mode == "dynamic"
        self.per_token = self.dynamic and iq is not None and iq.per_token
        if self.dynamic and not isinstance(layer, QuantLinear):
            raise ExportError(
                f"layer {self.name!r}: dynamic quantization exports Linear layers only"
            )
        self.weight_float = wq is None or wq.mode != "quantize"
        if self.weight_float:
            self.register_buffer("weight", layer.weight.detach().clone())
        else:
            w_q, w_scale, w_zp, self.w_axis, self.w_block, self.w_container = _stored_weight(layer)
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
        # Layers ONNX Runtime has no integer kernel for (4-bit weights or activations) run as a
        # float op on integer-valued tensors, which sums exactly, then one scaling: the same bits
        # as the simulation's integer form (QuantMixin.integer_forward).
        fusable = (
            not self.weight_float
            and self.w_container == 8
            and iq is not None
            and _activation_container_bits(iq.spec.bits) == 8
        )
        if not self.weight_float:
            unsigned_input = self.dynamic or (
                fusable and iq is not None and not iq.spec.signed and iq.mode == "quantize"
            )
            if (
                weight_storage == "exact"
                and unsigned_input
                and w_q.dtype == torch.int8
                and can_saturate(w_q)
            ):
                w_q, w_zp = as_uint8(w_q), as_uint8(w_zp)
            self.w_zero = not bool((w_zp != 0).any())
            self.register_buffer("weight_q", w_q)
            self.register_buffer("weight_scale", w_scale)
            self.register_buffer("weight_zero_point", w_zp)
        self.integer_pattern = layer.integer_form() and not fusable and not self.dynamic
        if self.integer_pattern:
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
        x = transform_input(x, self.input_channel_index, self.input_smooth_inv)
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


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lower(qmodel: nn.Module, weight_storage: str = "exact") -> nn.Module:
    """A copy of qmodel whose quantized layers call the export ops on stored integers.

    weight_storage "exact" stores 8-bit weights that meet uint8 activations as uint8 + 128 where
    int8 could saturate ONNX Runtime's u8s8 kernel (as_uint8); "int8" keeps every one int8.
    """
    with _quiet_exporter():  # deep-copying a traced GraphModule trips torch's pytree deprecation
        lowered = copy.deepcopy(qmodel).eval()
    for name, layer in list(quant_layers(lowered)):
        if isinstance(layer, QuantEmbedding):
            if layer.weight_quantizer is not None and layer.weight_quantizer.mode == "quantize":
                _set_submodule(lowered, name, LoweredEmbedding(layer))
            continue
        _set_submodule(
            lowered,
            name,
            LoweredLayer(layer, weight_storage),  # type: ignore[arg-type]
        )
    for name, m in list(lowered.named_modules()):
        if isinstance(m, TensorQuantizer):
            if m.mode == "quantize" and m.role == "activation":
                _set_submodule(lowered, name, LoweredQDQ(m))
            elif m.mode in ("observe", "dynamic"):
                raise ExportError(
                    f"quantizer {m.name!r} is in mode {m.mode!r}; calibrate the model before export"
                )
    return lowered


def batch_list(data: Any, name: str) -> list[Any]:
    """An iterable of batches (a list, a DataLoader) as a list; a TypeError naming `name` for a
    bare tensor (iterating it would give single samples, not batches) or a non-iterable."""
    if isinstance(data, Tensor):
        raise TypeError(
            f"{name} must be an iterable of batches (a list or a DataLoader), got a tensor of "
            f"shape {tuple(data.shape)}: pass [x] for one batch, or list(x.split(64))"
        )
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be an iterable of batches (a list or a DataLoader), "
            f"got {type(data).__name__}"
        )
    return list(data)


def _input_tensors(batch: Any) -> list[tuple[str, Tensor]]:
    """(position, tensor) of each tensor of a batch: "[0]", "[1]"... or "['input_ids']"."""
    args, kwargs = split_inputs(batch)
    found = [(f"[{i}]", a) for i, a in enumerate(args) if isinstance(a, Tensor)]
    return found + [(f"[{k!r}]", v) for k, v in kwargs.items() if isinstance(v, Tensor)]


def check_batch_values(batch: Any, what: str) -> None:
    """ValueError naming `what` for a batch that cannot verify anything: NaN, or no samples."""
    for pos, t in _input_tensors(batch):
        if t.dim() and t.shape[0] == 0:
            raise ValueError(f"{what}{pos} has an empty batch (shape {tuple(t.shape)})")
        if count := nonfinite(t, nan_only=True):
            raise ValueError(
                f"{what}{pos} holds NaN ({count} of {t.numel()} values): "
                "a model cannot be verified on it"
            )


def run_checked(model: nn.Module, batch: Any, what: str) -> Any:
    """model(batch) without gradients; a ValueError naming `what`, its shapes and the innermost
    layer that failed when the model cannot run it (a wrong shape, dtype or device)."""
    names = {m: n for n, m in model.named_modules()}
    entered: list[nn.Module] = []

    def enter(mod: nn.Module, inputs: Any) -> None:
        entered.append(mod)

    def leave(mod: nn.Module, inputs: Any, output: Any) -> None:
        if entered and entered[-1] is mod:
            entered.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in names]
    hooks += [m.register_forward_hook(leave) for m in names]
    args, kwargs = split_inputs(batch)
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as err:
        where = ""
        if entered and names.get(entered[-1]):
            where = f"layer {names[entered[-1]]!r} ({type(entered[-1]).__name__}) raised "
        raise ValueError(
            f"{what} ({describe_batch(batch)}) do not run through the model: "
            f"{where}{type(err).__name__}: {err}"
        ) from err
    finally:
        for h in hooks:
            h.remove()


def _dynamic_dims(t: Any) -> Any:
    if not isinstance(t, Tensor) or t.dim() == 0:
        return None
    dims = {0: torch.export.Dim.AUTO}
    if not t.is_floating_point() and t.dim() == 2:
        dims[1] = torch.export.Dim.AUTO  # token ids and masks: variable sequence length
    return dims


def ort_feed(names: list[str], batch: Any) -> dict[str, Any]:
    """One batch of model inputs as ONNX Runtime's feed: keyword tensors by name, positional
    tensors in order."""
    args, kwargs = split_inputs(batch)
    positional = [a for a in args if isinstance(a, Tensor)]
    feed: dict[str, Any] = {}
    for i, name in enumerate(names):
        t = kwargs.get(name) if name in kwargs else (positional[i] if i < len(positional) else None)
        if t is None:
            raise ExportError(f"no input for the ONNX model's input {name!r} in this batch")
        feed[name] = t.detach().cpu().numpy()
    return feed


def _outputs(out: Any) -> list[Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, Tensor)]


# --- the ONNX pass --------------------------------------------------------------------------


def _constants(graph: Any) -> dict[str, Any]:
    """Value name -> TensorProto of every initializer and single-output Constant node."""
    consts: dict[str, Any] = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    return consts


def fold_integer_casts(model: Any) -> int:
    """Replace Cast(constant int) -> INT4/UINT4 with packed INT4 initializers; drop what is unused."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    consts = _constants(graph)
    folded = 0
    keep = []
    new_inits = []
    for node in graph.node:
        to = (
            next((a.i for a in node.attribute if a.name == "to"), None)
            if node.op_type == "Cast"
            else None
        )
        if to in (ops.ONNX_INT4, ops.ONNX_UINT4) and node.input[0] in consts:
            values = numpy_helper.to_array(consts[node.input[0]]).astype(np.int32)
            lo, hi = (-8, 7) if to == ops.ONNX_INT4 else (0, 15)
            if values.size and (values.min() < lo or values.max() > hi):
                raise ExportError(
                    f"{node.input[0]}: values outside the 4-bit range cannot be stored as INT4"
                )
            import ml_dtypes

            # Packed two values a byte (raw data); make_tensor's int32_data would take ~1.5x more.
            kind = ml_dtypes.int4 if to == ops.ONNX_INT4 else ml_dtypes.uint4
            new_inits.append(numpy_helper.from_array(values.astype(kind), node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    # Drop initializers and Constant nodes nothing reads any more.
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for sub in (n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used):
        graph.node.remove(sub)
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return folded


# Ops that ONNX Runtime's QDQPropagationTransformer moves a DequantizeLinear across (its
# CanNodePropagate): each output value is one of the input's values, so it stays on the grid.
_GRID_PRESERVING_OPS = ("MaxPool", "Reshape", "Slice", "Squeeze", "Transpose", "Unsqueeze")


def requantize_after_moves(model: Any) -> int:
    """After each op in _GRID_PRESERVING_OPS that reads a DequantizeLinear with a per-tensor INT8
    zero point, and whose output reaches something other than a QuantizeLinear (a float op, a
    residual Add, a graph output), insert a QuantizeLinear/DequantizeLinear pair with the same
    scale and zero point; return how many pairs. Changes no value: the op's output is on that grid.

    Why: ONNX Runtime 1.32 inserts such pairs itself when it loads the model
    (QDQPropagationTransformer), and for an INT8 zero point the QuantizeLinear it inserts fails
    type inference ("output_dtype INT8 does not match y_zero_point type UINT8"), so the model
    does not load. Every signed-activation target (tflite-int8, tensorrt, dsp-pow2) meets it,
    e.g. on a shortcut that slices and pads a quantized tensor with a value other than 0, or
    zero-pads it with a concatenation, or on a max-pooled or reshaped quantized tensor read by a
    float op. With the pairs in place ONNX Runtime finds nothing to propagate. A DequantizeLinear
    with several readers counts too: ONNX Runtime first gives each reader its own copy.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    consts = _constants(graph)

    def signed_per_tensor(dq: Any) -> bool:
        if len(dq.input) < 3 or not dq.input[2] or dq.input[2] not in consts:
            return False
        zero_point = consts[dq.input[2]]
        return zero_point.data_type == TensorProto.INT8 and math.prod(zero_point.dims) == 1

    names = {n.name for n in graph.node}
    values = {v for n in graph.node for v in (*n.input, *n.output)} | set(consts)

    def fresh(base: str, taken: set[str]) -> str:
        name, index = base, 0
        while name in taken:
            index += 1
            name = f"{base}_{index}"
        taken.add(name)
        return name

    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    nodes = list(graph.node)
    inserted = 0
    index = 0
    while index < len(nodes):
        node = nodes[index]
        index += 1
        source = producer.get(node.input[0]) if node.input else None
        if (
            node.op_type not in _GRID_PRESERVING_OPS
            or source is None
            or source.op_type != "DequantizeLinear"
            or not signed_per_tensor(source)
        ):
            continue
        out = node.output[0]
        readers = [n for n in nodes if out in n.input]
        if out not in outputs and all(r.op_type == "QuantizeLinear" for r in readers):
            continue
        # The op now writes `moved`; the new DequantizeLinear writes the old name, so every
        # reader (and a graph output) keeps its input; QuantizeLinear readers take `moved` directly.
        moved = fresh(f"{out}_moved", values)
        requantized = fresh(f"{out}_requantized", values)
        node.output[0] = moved
        for reader in readers:
            if reader.op_type == "QuantizeLinear":
                reader.input[0] = moved
        scale, zero_point = source.input[1], source.input[2]
        quantize = helper.make_node(
            "QuantizeLinear",
            [moved, scale, zero_point],
            [requantized],
            name=fresh(f"{node.name or out}_requantize", names),
        )
        dequantize = helper.make_node(
            "DequantizeLinear",
            [requantized, scale, zero_point],
            [out],
            name=fresh(f"{node.name or out}_dequantize", names),
        )
        nodes[index:index] = [quantize, dequantize]
        producer[moved], producer[requantized], producer[out] = node, quantize, dequantize
        index += 2
        inserted += 1
    if inserted:
        del graph.node[:]
        graph.node.extend(nodes)
    return inserted


def strip_metadata(model: Any) -> None:
    """Drop the exporter's per-node provenance (stack traces, FX names): a third of a small file."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in list(model.graph.value_info):
        del value.metadata_props[:]
    del model.metadata_props[:]


# QuantizeLinear / DequantizeLinear attributes at their opset-21 defaults: the exporter writes
# all four on every node, about 60 bytes a node, which a node without them means just as well.
_QDQ_DEFAULTS = {"axis": 1, "block_size": 0, "output_dtype": 0, "saturate": 1}


def drop_value_info(model: Any) -> int:
    """Remove the shape and type annotations of intermediate values (runtimes infer them; about
    13 KB, 6 %, of a 4-bit ResNet-20 file); return how many were removed."""
    count = len(model.graph.value_info)
    del model.graph.value_info[:]
    return count


def drop_default_attributes(model: Any) -> int:
    """Remove the Q/DQ attributes that equal their defaults (same graph, smaller file); return
    how many were removed."""
    from onnx import AttributeProto

    def is_default(attribute: Any) -> bool:
        default = _QDQ_DEFAULTS.get(attribute.name)
        return attribute.type == AttributeProto.INT and default == attribute.i

    removed = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.domain not in ("", "ai.onnx"):
            continue
        keep = [a for a in node.attribute if not is_default(a)]
        if len(keep) != len(node.attribute):
            removed += len(node.attribute) - len(keep)
            del node.attribute[:]
            node.attribute.extend(keep)
    return removed


def integer_weight_count(model: Any) -> tuple[int, list[str]]:
    """How many DequantizeLinear nodes read integer constants; and any that read float ones."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    consts = {
        n.output[0]: next(a.t for a in n.attribute if a.name == "value")
        for n in model.graph.node
        if n.op_type == "Constant"
    }
    consts.update(inits)
    integer, bad = 0, []
    for node in model.graph.node:
        if node.op_type in ("DequantizeLinear",) and node.input[0] in consts:
            dtype = consts[node.input[0]].data_type
            if dtype in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
                bad.append(node.input[0])
            else:
                integer += 1
        if node.op_type == "MatMulInteger" and node.input[1] in consts:
            integer += 1
        if (
            node.op_type == "Gather"
            and node.input[0] in consts
            and consts[node.input[0]].data_type in (TensorProto.INT8, TensorProto.INT16)
        ):
            integer += 1
    return integer, bad


# Ops whose int8 weights ONNX Runtime multiplies in a u8s8 kernel once it fuses them.
_WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def exact_kernel_model(model: Any) -> tuple[Any, list[str]]:
    """A copy of an exported model in which every INT8 weight (zero point 0, some |w| > 64) that
    a Conv/Gemm/MatMul multiplies with INT8 activations is stored as UINT8 + 128 instead, and
    the names of those weights. The copy computes the same values on the same grids.

    Why: the signed-activation targets (tflite-int8, tensorrt, dsp-pow2, mcu-int8) keep INT8
    weights with zero point 0, which their runtimes (TFLite, TensorRT, CMSIS-NN, ONNX Runtime on
    Arm) multiply with INT8 activations in INT32, exactly. ONNX Runtime on x86 instead converts
    every INT8 activation Q/DQ pair to UINT8 when it loads a model (QDQS8ToU8Transformer) and
    keeps the weights INT8, so the layer runs in its u8s8 kernel, which saturates on CPUs
    without VNNI (as_uint8); its own remedy, the session option session.x64quantprecision,
    fails on per-channel weights (ONNX Runtime 1.2x: "x_zero_point must be null or 1D tensor").
    Measured on a small VGG for tflite-int8: 25.8 dB from the file as written, 146 dB from this
    copy, inf dB from the file with ONNX Runtime's graph optimizations off. Verification on
    such a CPU runs this copy; the file keeps the target's INT8 weights.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    copy_ = type(model)()
    copy_.CopyFrom(model)
    graph = copy_.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def int8_zero_point(dq: Any) -> bool:
        if len(dq.input) < 3 or not dq.input[2]:
            return False
        zp = inits.get(dq.input[2])
        return zp is not None and zp.data_type == TensorProto.INT8

    rewritten: list[str] = []
    done: set[str] = set()
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2:
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        # A Linear on a 3-D input exports as MatMul(x, Transpose(DequantizeLinear(w))); ONNX
        # Runtime moves the Transpose onto the integers and fuses the rest the same way.
        while w_dq is not None and w_dq.op_type == "Transpose":
            w_dq = producer.get(w_dq.input[0])
        if x_dq is None or w_dq is None or "DequantizeLinear" not in (x_dq.op_type, w_dq.op_type):
            continue
        if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        weight = inits.get(w_dq.input[0])
        if weight is None or weight.data_type != TensorProto.INT8 or not int8_zero_point(x_dq):
            continue
        zp = inits.get(w_dq.input[2]) if len(w_dq.input) > 2 and w_dq.input[2] else None
        if zp is not None and (zp.data_type != TensorProto.INT8 or numpy_helper.to_array(zp).any()):
            continue
        if w_dq.name in done:
            continue
        values = numpy_helper.to_array(weight)
        if not can_saturate(torch.from_numpy(values.astype(np.int16))):
            continue
        scale = numpy_helper.to_array(inits[w_dq.input[1]]) if w_dq.input[1] in inits else None
        zp_shape = scale.shape if scale is not None else ()
        u8 = numpy_helper.from_array((values.astype(np.int16) + 128).astype(np.uint8), "")
        u8.name = f"{weight.name}_as_uint8"
        u8_zp = numpy_helper.from_array(np.full(zp_shape, 128, dtype=np.uint8), "")
        u8_zp.name = f"{weight.name}_as_uint8_zero_point"
        graph.initializer.extend([u8, u8_zp])
        w_dq.input[0] = u8.name
        if len(w_dq.input) > 2:
            w_dq.input[2] = u8_zp.name
        else:
            while len(w_dq.input) < 2:
                w_dq.input.append("")
            w_dq.input.append(u8_zp.name)
        done.add(w_dq.name)
        rewritten.append(weight.name)
    used = {i for n in graph.node for i in n.input}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)
    return copy_, rewritten


def exact_session(onnx_path: str | os.PathLike[str], options: Any = None) -> tuple[Any, list[str]]:
    """An ONNX Runtime CPU session that computes what an exported model means, and the INT8
    weights it runs as UINT8 + 128: on x86 CPUs without VNNI, of exact_kernel_model's copy
    (signed-activation targets), elsewhere of the file itself. What verification runs; a
    measurement of a signed-target export's deployed metric on this machine should run it too.
    """
    import onnx
    import onnxruntime as ort

    source: Any = str(onnx_path)
    names: list[str] = []
    if u8s8_saturates_here():
        exact, names = exact_kernel_model(onnx.load(str(onnx_path)))
        if names:
            source = exact.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session, names


# --- verification ---------------------------------------------------------------------------


@dataclass
class Verification:
    """How the deployed model compares with the simulation.

    floor_*: the same comparison between the simulation and itself with every quantized layer's
    input perturbed by one part in 10^7 (float rounding noise). A deep network whose
    activations are rounded to a coarse grid amplifies such noise: a value within rounding
    error of a step boundary lands on the other side, and the change spreads. The runtime adds
    exactly this kind of noise (other summation orders, fused kernels), so the deployed model
    cannot agree with the simulation better than the floor; it must agree about as well.
    """

    samples: int = 0
    top1_agreement: float | None = None
    sqnr_db: float = float("inf")
    max_abs_err: float = 0.0
    floor_top1_agreement: float | None = None
    floor_sqnr_db: float = float("inf")
    required_sqnr_db: float = 0.0
    required_top1_agreement: float | None = None
    passed: bool = False
    reason: str = ""
    # INT8 weights that ran as UINT8 + 128 in verification (exact_kernel_model): this CPU's
    # ONNX Runtime would saturate on them; the file keeps them INT8.
    weights_run_as_uint8: list[str] = field(default_factory=list)


class _Compare:
    """Accumulates SQNR, max error and top-1 agreement of output lists, batch by batch."""

    def __init__(self) -> None:
        self.signal: list[float] = []
        self.noise: list[float] = []
        self.agree = self.compared = 0
        self.max_abs_err = 0.0

    def add(self, ref: list[Tensor], test: list[Tensor], classify: bool) -> None:
        if len(ref) != len(test):
            raise ExportError(f"ONNX model has {len(test)} outputs, the PyTorch model {len(ref)}")
        if not self.signal:
            self.signal, self.noise = [0.0] * len(ref), [0.0] * len(ref)
        for k, (r, t) in enumerate(zip(ref, test, strict=False)):
            if r.shape != t.shape:
                raise ExportError(
                    f"output {k}: ONNX Runtime gave shape {tuple(t.shape)}, the simulation {tuple(r.shape)}"
                )
            r64, t64 = r.double(), t.double()
            self.signal[k] += float(r64.pow(2).sum())
            self.noise[k] += float((r64 - t64).pow(2).sum())
            if r.numel():
                self.max_abs_err = max(self.max_abs_err, float((r64 - t64).abs().max()))
        if classify:
            self.agree += int((ref[0].argmax(1) == test[0].argmax(1)).sum())
            self.compared += int(ref[0].shape[0])

    @property
    def sqnr_db(self) -> float:
        return min(
            (
                float("inf") if n == 0 else 10 * math.log10(max(s, 1e-300) / n)
                for s, n in zip(self.signal, self.noise, strict=False)
            ),
            default=float("inf"),
        )

    @property
    def agreement(self) -> float | None:
        return self.agree / self.compared if self.compared else None


def _perturbed(qmodel: nn.Module, relative: float, seed: int) -> list[Any]:
    """Hooks that multiply every quantized layer's input by (1 + relative * noise)."""
    gen = torch.Generator().manual_seed(seed)

    def hook(mod: nn.Module, inputs: tuple[Any, ...]) -> Any:
        x = inputs[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return (x * (1 + relative * noise),) + tuple(inputs[1:])

    return [m.register_forward_pre_hook(hook) for _, m in quant_layers(qmodel)]


def verify_onnx(
    onnx_path: str | os.PathLike[str],
    qmodel: nn.Module,
    inputs: Iterable[Any],
    min_top1_agreement: float = 0.995,
    min_sqnr_db: float = 30.0,
    threads: int = 0,
    floor_margin_db: float = 6.0,
    batch_names: list[str] | None = None,
) -> Verification:
    """Run the ONNX model in ONNX Runtime and the simulation in PyTorch on the same inputs.

    Passes when the deployed outputs agree with the simulated ones to min_sqnr_db (or, for a
    model whose own float-rounding floor is lower, to within floor_margin_db of that floor)
    and, for classifiers, on min_top1_agreement of top-1 predictions (or the floor's agreement,
    if lower). batch_names: what to call each batch in an error (default "inputs[i]").
    """
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        sess, as_uint8_names = exact_session(onnx_path, opts)
    except Exception as err:  # ORT raises its own exception types; nothing was written
        raise ExportError(f"ONNX Runtime cannot load the exported model: {err}") from err
    names = [i.name for i in sess.get_inputs()]
    deployed, floor = _Compare(), _Compare()
    samples = 0
    classify = False
    qmodel.eval()
    for index, batch in enumerate(inputs):
        args, kwargs = split_inputs(batch)
        what = batch_names[index] if batch_names is not None else f"inputs[{index}]"
        with torch.no_grad():
            sim = _outputs(run_checked(qmodel, batch, what))
            hooks = _perturbed(qmodel, 1e-7, seed=index)
            try:
                sim_noisy = _outputs(qmodel(*args, **kwargs))
            finally:
                for h in hooks:
                    h.remove()
        try:
            raw = sess.run(None, ort_feed(names, batch))
        except Exception as err:  # ORT's own exception types: say which batch it refused
            raise ValueError(
                f"ONNX Runtime cannot run the exported model on {what} ({describe_batch(batch)}): {err}"
            ) from err
        dep = [torch.from_numpy(np.asarray(o)) for o in raw]
        if index == 0:
            classify = sim[0].dim() == 2 and sim[0].shape[1] > 1 and sim[0].is_floating_point()
        deployed.add(sim, dep, classify)
        floor.add(sim, sim_noisy, classify)
        samples += int(sim[0].shape[0]) if sim[0].dim() else 1
    if not deployed.signal:
        raise ValueError("verification needs at least one batch of inputs")
    v = Verification(
        samples=samples,
        top1_agreement=deployed.agreement,
        sqnr_db=deployed.sqnr_db,
        max_abs_err=deployed.max_abs_err,
        floor_top1_agreement=floor.agreement,
        floor_sqnr_db=floor.sqnr_db,
        weights_run_as_uint8=as_uint8_names,
    )
    v.required_sqnr_db = min(min_sqnr_db, v.floor_sqnr_db - floor_margin_db)
    problems = []
    if v.sqnr_db < v.required_sqnr_db:
        problems.append(
            f"SQNR {v.sqnr_db:.1f} dB < {v.required_sqnr_db:.1f} dB "
            f"(float-rounding floor of the simulation: {v.floor_sqnr_db:.1f} dB)"
        )
    if v.top1_agreement is not None:
        v.required_top1_agreement = min(min_top1_agreement, floor.agreement or 1.0)
        if v.top1_agreement < v.required_top1_agreement:
            problems.append(
                f"top-1 agreement {v.top1_agreement:.4f} < {v.required_top1_agreement:.4f}"
            )
    v.passed = not problems
    v.reason = "; ".join(problems)
    return v


# --- the entry point ------------------------------------------------------------------------


@dataclass
class ExportInfo:
    path: str
    size_bytes: int
    float_params_bytes: int
    size_ratio: float
    quantized_layers: int
    integer_weights: int
    verification: Verification = field(default_factory=Verification)
    wall_s: float = 0.0
    opset: int = OPSET
    # Fully integer targets (spec.Target.fully_integer): the graph property was checked and
    # holds (every compute node reads DequantizeLinear outputs and feeds QuantizeLinear);
    # None for other targets, which do not ask for it.
    fully_integer: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        v = self.verification
        agree = f", top-1 agreement {v.top1_agreement:.4f}" if v.top1_agreement is not None else ""
        return (
            f"wrote {self.path}: {self.size_bytes} bytes ({self.size_ratio:.3f}x the float parameters), "
            f"{self.integer_weights} integer weight tensors for {self.quantized_layers} quantized layers; "
            f"verified in ONNX Runtime on {v.samples} samples: SQNR {v.sqnr_db:.1f} dB "
            f"(float-rounding floor {v.floor_sqnr_db:.1f} dB){agree}"
            + (
                f"; {len(v.weights_run_as_uint8)} INT8 weight tensors beside INT8 activations "
                "ran as UINT8 + 128: ONNX Runtime on this CPU (x86 without VNNI) converts INT8 "
                "activations to UINT8 and would saturate its u8s8 kernel on the file as written, "
                "which int8 runtimes (TFLite, TensorRT, CMSIS-NN, ONNX Runtime on Arm) compute "
                "exactly"
                if v.weights_run_as_uint8
                else ""
            )
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
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


def export_float_onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any) -> None:
    """The float model as ONNX (opset 21, one file, dynamic batch and sequence length): the
    baseline that quantized exports are compared with."""
    import onnx

    args, kwargs = split_inputs(example_inputs)
    dynamic_shapes: Any = (
        {k: _dynamic_dims(v) for k, v in kwargs.items()}
        if kwargs
        else tuple(_dynamic_dims(a) for a in args)
    )
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs or None,
            dynamo=True,
            opset_version=OPSET,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    assert program is not None
    model_proto = program.model_proto
    # Without the exporter's provenance and shape annotations, as export_onnx writes its files:
    # the size ratio of a quantized export to this file compares like with like.
    strip_metadata(model_proto)
    drop_value_info(model_proto)
    with atomic_path(path, suffix=".onnx.tmp") as tmp:
        onnx.save_model(model_proto, str(tmp))


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    verify_data: Iterable[Any] | None = None,
    min_top1_agreement: float = 0.995,
    min_sqnr_db: float = 30.0,
    weight_storage: str = "exact",
) -> ExportInfo:
    """Write qmodel as an ONNX QDQ model (opset 21) at `path`, after proving in ONNX Runtime that
    it computes what the simulation computes (on example_inputs and on verify_data when given).

    weight_storage: "exact" (default) stores the 8-bit weights of a layer with uint8 inputs as
    UINT8 with zero point 128 wherever some |w| > 64, so ONNX Runtime runs its u8u8 kernel, exact
    on every CPU. "int8" keeps them INT8: ONNX Runtime's faster u8s8 kernel, exact only on CPUs
    with VNNI (AVX-VNNI, AVX512-VNNI) or Arm dot-product instructions; on x86 without VNNI it
    saturates, and verification, which runs on this machine, refuses the file.

    Nothing is written if export or verification fails (ExportError); an existing file at `path`
    is replaced only by a verified model.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    layers = list(quant_layers(qmodel))
    if not layers:
        raise ValueError(
            "qmodel has no quantized layer: run edgequant.quantize (or prepare_qat) first"
        )
    modes = [q.mode for q in qmodel.modules() if isinstance(q, TensorQuantizer)]
    if "observe" in modes:
        raise ValueError(
            "qmodel still has quantizers observing (calibration did not finish): quantize it with "
            "edgequant.quantize first"
        )
    if not any(m in ("quantize", "dynamic") for m in modes):
        raise ValueError(
            "no quantizer of qmodel is active (uncalibrated or all disabled): there is nothing "
            "integer to export; use edgequant.quantize first"
        )
    if weight_storage not in WEIGHT_STORAGE:
        raise ValueError(
            f"weight_storage must be one of {', '.join(map(repr, WEIGHT_STORAGE))}, "
            f"got {weight_storage!r}"
        )
    for name, value, low, high in (
        ("min_top1_agreement", min_top1_agreement, 0.0, 1.0),
        ("min_sqnr_db", min_sqnr_db, -math.inf, math.inf),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not low <= value <= high:
            raise ValueError(
                f"{name} must be "
                + ("a fraction in [0, 1]" if name == "min_top1_agreement" else "a finite number")
                + f", got {value!r}"
            )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    if path.exists() and path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{str(path.parent)!r}, the folder of path, is a file, not a folder")
    if not path.parent.exists():
        raise ValueError(f"the folder {str(path.parent)!r} does not exist")
    for pos, t in _input_tensors(example_inputs):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise TypeError(
                f"example_inputs{pos} has dtype {t.dtype}; the exported model takes float32 "
                "inputs (its scales are float32): pass it as .float()"
            )
    check_batch_values(example_inputs, "example_inputs")
    verify = batch_list(verify_data, "verify_data") if verify_data is not None else []
    for i, batch in enumerate(verify):
        check_batch_values(batch, f"verify_data[{i}]")  # refuses a batch of the wrong kind too
    # Export and verification need eval mode; the caller's flags come back at the end (STYLE §9).
    training = {m: m.training for m in qmodel.modules()}
    try:
        qmodel.eval()
        run_checked(qmodel, example_inputs, "example_inputs")
        return _export(
            qmodel,
            path,
            example_inputs,
            verify,
            min_top1_agreement,
            min_sqnr_db,
            weight_storage,
            layers,
        )
    finally:
        for m, flag in training.items():
            m.training = flag


def _export(
    qmodel: nn.Module,
    path: Path,
    example_inputs: Any,
    verify: list[Any],
    min_top1_agreement: float,
    min_sqnr_db: float,
    weight_storage: str,
    layers: list[tuple[str, nn.Module]],
) -> ExportInfo:
    import onnx

    args, kwargs = split_inputs(example_inputs)
    start = time.perf_counter()
    lowered = lower(qmodel, weight_storage)
    dynamic_shapes: Any
    if kwargs:
        dynamic_shapes = {k: _dynamic_dims(v) for k, v in kwargs.items()}
    else:
        dynamic_shapes = tuple(_dynamic_dims(a) for a in args)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                lowered,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                opset_version=OPSET,
                custom_translation_table=ops.translation_table(),  # type: ignore[arg-type]
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; say which stage failed
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    assert program is not None
    model = program.model_proto
    _check_integer_inputs(model)
    fold_integer_casts(model)
    strip_metadata(model)
    drop_default_attributes(model)
    fully_integer = _fully_integer_target(qmodel)
    if fully_integer:
        from edgequant.export.integer import (
            fold_activations_into_quantizers,
            fully_integer_violations,
            merge_slices,
            quantize_inputs_first,
        )

        merge_slices(model)
        quantize_inputs_first(model)
        fold_activations_into_quantizers(model)
        problems = fully_integer_violations(model)
        if problems:
            raise ExportError(
                f"target {fully_integer} needs a fully integer graph, and {len(problems)} "
                f"edges of this one are float (run edgequant check first): "
                + "; ".join(problems[:5])
            )
    requantize_after_moves(model)
    integer, float_dq = integer_weight_count(model)
    quantized = sum(
        1
        for _, m in layers
        if m.weight_quantizer is not None and m.weight_quantizer.mode == "quantize"
    )
    if float_dq or integer < quantized:
        raise ExportError(
            f"the exported graph does not store every quantized weight as integers "
            f"({integer} integer weights for {quantized} quantized layers; float: {float_dq[:5]})"
        )
    drop_value_info(model)
    onnx.checker.check_model(model)
    with atomic_path(path, suffix=".onnx.tmp") as tmp:
        onnx.save_model(model, str(tmp))
        batches = [example_inputs] + verify
        batch_names = ["example_inputs"] + [f"verify_data[{i}]" for i in range(len(verify))]
        v = verify_onnx(
            tmp, qmodel, batches, min_top1_agreement, min_sqnr_db, batch_names=batch_names
        )
        if not v.passed:
            hint = ""
            if weight_storage == "int8" and u8s8_saturates_here():
                hint = (
                    " (weight_storage='int8' on an x86 CPU without VNNI, where ONNX Runtime's "
                    "u8s8 kernel saturates: export with weight_storage='exact', or on a CPU "
                    "like the one you deploy to)"
                )
            raise ExportError(
                f"the exported model does not compute what the simulation computes: {v.reason}"
                f"{hint}; nothing was written"
            )
        size = tmp.stat().st_size
    float_bytes = sum(4 * p.numel() for p in qmodel.parameters())
    return ExportInfo(
        path=str(path),
        size_bytes=size,
        float_params_bytes=float_bytes,
        size_ratio=size / max(float_bytes, 1),
        quantized_layers=quantized,
        integer_weights=integer,
        verification=v,
        wall_s=time.perf_counter() - start,
        fully_integer=True if fully_integer else None,
    )


def _check_integer_inputs(model: Any) -> None:
    """ValueError for a graph input of an integer type that a QuantizeLinear reads: the
    simulation quantizes integer example inputs as floats, ONNX Runtime refuses the graph."""
    from onnx import TensorProto

    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        if elem in (TensorProto.FLOAT, TensorProto.UNDEFINED):
            continue
        if any(
            n.op_type == "QuantizeLinear" and n.input[:1] == [value.name] for n in model.graph.node
        ):
            raise ValueError(
                f"example_inputs: the model's input {value.name!r} is "
                f"{TensorProto.DataType.Name(elem).lower()}, and its first layer quantizes it "
                "as float activations: pass it as a float32 tensor (.float())"
            )


def _fully_integer_target(qmodel: nn.Module) -> str | None:
    """The name of qmodel's target when that target is fully integer (mcu-int8), else None."""
    from edgequant.targets import TARGETS

    summary = getattr(qmodel, "quant_summary", None)
    target = TARGETS.get(getattr(summary, "target", ""))
    return target.name if target is not None and target.fully_integer else None
