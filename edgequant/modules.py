"""Quantized wrappers of the float layers: the float op with an input and a weight quantizer.

They subclass the float module, so `isinstance(m, nn.Conv2d)` still holds and the state dict
keeps the float names (`weight`, `bias`) plus the quantizers' buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.quantizer import TensorQuantizer
from edgequant.spec import QuantSpec

BIAS_QMIN, BIAS_QMAX = -(2**31), 2**31 - 1


def fold_batchnorm(
    weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm1d | nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv/linear into its weight and bias."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "cannot fold a BatchNorm without running statistics (track_running_stats=False)"
        )
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    w = weight * factor.reshape((-1,) + (1,) * (weight.dim() - 1))
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return w.detach().clone(), ((b - bn.running_mean) * factor + beta).detach().clone()


if TYPE_CHECKING:
    # QuantMixin is only ever mixed into nn.Module subclasses; to the type checker it is one.
    _MixinBase = nn.Module
else:
    _MixinBase = object


def transform_input(
    x: Tensor, channel_index: Tensor | None, smooth_inv: Tensor | None, tail: Tensor | None = None
) -> Tensor:
    """x's channels (last dim) gathered by channel_index (outlier splitting), then divided by the
    smoothing factors (smooth_inv: their inverses); in the graph, a Gather and a Mul. With
    `tail`, channel_index is in the order split_concat_order gives (every channel once, in
    order, then the repeated ones, `tail`): x and its gathered tail concatenated, the same
    values without gathering every channel."""
    if tail is not None:
        x = torch.cat([x, x.index_select(-1, tail)], dim=-1)
    elif channel_index is not None:
        x = x.index_select(-1, channel_index)
    if smooth_inv is not None:
        x = x * smooth_inv
    return x


def split_concat_order(index: Tensor) -> Tensor | None:
    """The order of an outlier-split channel index's entries that puts each channel's first
    copy first, in channel order (index[order] is 0, 1, ..., C - 1, then the repeated channels);
    None where the index does not hold every channel 0 .. C - 1."""
    positions = torch.arange(index.numel(), device=index.device)
    channels = int(index.max()) + 1
    first = torch.full((channels,), index.numel(), dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, index, positions, reduce="amin")
    if bool((first == index.numel()).any()):
        return None
    repeated = torch.ones(index.numel(), dtype=torch.bool, device=index.device)
    repeated[first] = False
    return torch.cat([first, positions[repeated]])


class QuantMixin(_MixinBase):
    """Shared by every quantized layer: the quantizers and the quantized (weight, bias)."""

    input_quantizer: TensorQuantizer | None
    weight_quantizer: TensorQuantizer | None
    weight: Tensor
    bias: Tensor | None
    input_smooth_inv: Tensor | None
    input_channel_index: Tensor | None
    input_block_int8: Tensor | None

    def _init_quant(
        self, weight_spec: QuantSpec | None, act_spec: QuantSpec | None, name: str
    ) -> None:
        self.layer_name = name
        # Eval mode computes in the exact integer form (integer_forward); calibration passes turn
        # it off (fast_simulation) for speed: the float form differs only by float rounding.
        self.exact_integer = True
        # True when the graph quantizes this layer's input before it arrives (shared quantizer).
        self.shared_input = False
        # SmoothQuant: the input is divided by a per-channel factor the weight was multiplied by.
        self.register_buffer("input_smooth_inv", None)
        # Outlier channel splitting (Linear only): the input's channels gathered by this index
        # (an outlier channel repeated), before the smoothing multiply; see ptq/smoothquant.py.
        self.register_buffer("input_channel_index", None)
        # Int8 inputs per token and per block of this many input elements, computed at run time
        # (a 0-dim int64 tensor, or None): how ONNX Runtime's MatMulNBits at accuracy_level=4
        # rounds its input (functional.block_int8_fake_quantize); set by ptq/weight_only.py.
        self.register_buffer("input_block_int8", None)
        self.weight_quantizer = (
            TensorQuantizer(weight_spec, f"{name}.weight", role="weight")
            if weight_spec is not None
            else None
        )
        self.input_quantizer = (
            TensorQuantizer(act_spec, f"{name}.input", role="activation")
            if act_spec is not None
            else None
        )

    def transform_input(self, x: Tensor) -> Tensor:
        """The layer's input as its weight multiplies it (see `transform_input`)."""
        return transform_input(x, self.input_channel_index, self.input_smooth_inv)

    def bias_scale(self) -> Tensor | None:
        """Scale of the INT32 bias (input scale x weight scale), or None when the bias stays float:
        as ONNX Runtime and TFLite do, the bias is quantized only when both the input and the
        weight are statically quantized on per-tensor / per-channel grids."""
        iq, wq = self.input_quantizer, self.weight_quantizer
        if self.bias is None or iq is None or wq is None:
            return None
        if iq.mode != "quantize" or wq.mode != "quantize" or not iq.spec.per_tensor:
            return None
        if wq.spec.granularity == "group":
            return None
        return (iq.scale.reshape(()) * wq.scale).float()

    def integer_form(self) -> bool:
        """True when this layer computes in the integer form (eval mode, static per-tensor
        input, per-tensor or per-output-channel weights): see `integer_forward`."""
        iq, wq = self.input_quantizer, self.weight_quantizer
        return (
            not self.training
            and getattr(self, "exact_integer", True)
            and iq is not None
            and wq is not None
            and iq.mode == "quantize"
            and wq.mode == "quantize"
            and iq.spec.per_tensor
            and (wq.spec.per_tensor or (wq.spec.granularity == "channel" and wq.spec.axis == 0))
            and not bool((wq.zero_point != 0).any())
        )

    def integer_forward(self, x: Tensor, op: Any) -> Tensor:
        """The layer as an integer runtime computes it: integer input x integer weight, summed
        exactly, then one float32 scaling per output channel and the bias.

        The fake-quantized float form (quantized_inputs) computes the same up to float rounding,
        but a deep network rounds its activations onto a grid again after every layer, so those
        1-ulp differences flip values that sit on a rounding boundary and the flips spread. Here
        the sum is exact (float64 holds every int32 sum), so the runtime (ONNX Runtime's
        integer kernels, or its float kernels on integer-valued tensors) computes the same bits.
        `op(x, w)` is the layer's float op without bias.
        """
        iq, wq = self.input_quantizer, self.weight_quantizer
        assert iq is not None and wq is not None
        x = self.transform_input(x)
        zp = iq.zero_point.reshape(()).float()
        # Division, as ONNX Runtime's QuantizeLinear does (not multiplication by the reciprocal).
        x_int = (
            torch.clamp(torch.round(x / iq.scale.reshape(())) + zp, iq.spec.qmin, iq.spec.qmax) - zp
        )
        w_int = F.quantize(
            self.weight, wq.scale, wq.zero_point, wq.spec.qmin, wq.spec.qmax, wq.axis
        )
        acc64 = op(x_int.double(), w_int.double())
        # The output rounded onto the next quantizer's grid as the runtime's fused kernel does
        # (ort_kernels.FusedRequantize), where the graph has one.
        fused = self.__dict__.get("fused_requantize")
        if fused is not None and fused.active(self):
            return cast(Tensor, fused(self, acc64))
        acc = acc64.float()
        scale = (iq.scale.reshape(()) * wq.scale).float()
        shape = [1] * acc.dim()
        channel_dim = -1 if isinstance(self, nn.Linear) else 1
        shape[channel_dim] = -1
        y = acc * scale.reshape(shape)
        if self.bias is not None:
            y = y + self.integer_bias(scale).reshape(shape)
        return y

    def integer_bias(self, scale: Tensor) -> Tensor:
        """The bias on the INT32 grid of the accumulator (scale: input scale x weight scale)."""
        assert self.bias is not None
        axis = 0 if scale.numel() > 1 else None
        zp = torch.zeros(scale.shape, dtype=torch.int32)
        q = F.quantize(self.bias.detach(), scale, zp, BIAS_QMIN, BIAS_QMAX, axis)
        return F.dequantize(q, scale, zp, axis).expand(self.bias.shape)

    def quantized_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x = self.transform_input(x)
        if self.input_quantizer is not None and not self.shared_input:
            x = self.input_quantizer(x)
        if self.input_block_int8 is not None:
            x = F.block_int8_fake_quantize(x, int(self.input_block_int8))
        w = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        b: Tensor | None = self.bias
        bias_scale = self.bias_scale()
        if b is not None and bias_scale is not None:
            axis = 0 if bias_scale.numel() > 1 else None
            zp = torch.zeros(bias_scale.shape, dtype=torch.int32, device=b.device)
            b = F.fake_quantize(b, bias_scale, zp, BIAS_QMIN, BIAS_QMAX, axis)
        return x, w, b


@contextlib.contextmanager
def fast_simulation(model: nn.Module) -> Iterator[None]:
    """Layers compute in the fake-quantized float form (not the exact integer form) inside the
    block: for calibration passes, where float-rounding differences do not matter."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (QuantMixin, QuantMatMul)) or hasattr(m, "exact_integer")
    ]
    saved = [bool(m.exact_integer) for m in layers]
    try:
        for m in layers:
            m.exact_integer = False  # type: ignore[assignment]
        yield
    finally:
        for m, flag in zip(layers, saved, strict=True):
            m.exact_integer = flag  # type: ignore[assignment]


def _new_params(new: QuantMixin, weight: Tensor, bias: Tensor | None) -> None:
    new.weight = nn.Parameter(weight.detach().clone())
    new.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None


def _quant_conv_forward(layer: QuantConv1d | QuantConv2d, x: Tensor) -> Tensor:
    """QuantConv1d's and QuantConv2d's forward: the layer's own convolution (`_conv_forward` of
    nn.Conv1d / nn.Conv2d) on the quantized input and weight, or on the integers."""
    if layer.integer_form():
        return layer.integer_forward(x, lambda a, w: layer._conv_forward(a, w, None))
    x, w, b = layer.quantized_inputs(x)
    return layer._conv_forward(x, w, b)


class QuantConv1d(QuantMixin, nn.Conv1d):
    def forward(self, x: Tensor) -> Tensor:
        return _quant_conv_forward(self, x)


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return _quant_conv_forward(self, x)


class QuantLinear(QuantMixin, nn.Linear):
    # torch's Linear declares its bias as a Parameter, but bias=False leaves it None.
    bias: Tensor | None  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        iq, wq = self.input_quantizer, self.weight_quantizer
        if iq is not None and iq.mode == "dynamic" and wq is not None and wq.mode == "quantize":
            # Integer-exact, as the runtime's MatMulInteger computes it.
            x = self.transform_input(x)
            w_q = F.quantize(
                self.weight, wq.scale, wq.zero_point, wq.spec.qmin, wq.spec.qmax, wq.axis
            )
            return F.dynamic_quantized_linear(
                x, w_q.t(), wq.scale, self.bias, iq.spec.qmin, iq.spec.qmax, iq.per_token
            )
        if self.integer_form():
            return self.integer_forward(x, torch_F.linear)
        x, w, b = self.quantized_inputs(x)
        return torch_F.linear(x, w, b)


class QuantEmbedding(QuantMixin, nn.Embedding):
    """An embedding table with integer weights (one scale per row by default); its inputs are
    indices, so it has no input quantizer."""

    bias = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return torch_F.embedding(
            x,
            w,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


class QuantMatMul(nn.Module):
    """`input @ other` of two activations (attention's Q·Kᵀ and P·V), each operand quantized on
    its own per-tensor grid by a calibrated activation quantizer, as an integer runtime computes
    it (ONNX Runtime: DequantizeLinear on both inputs of a MatMul, fused into an integer matmul).

    `op` names the float op it stands for (torch.matmul, torch.bmm): both compute the same."""

    def __init__(self, act_spec: QuantSpec, name: str, op: str = "matmul") -> None:
        super().__init__()
        self.layer_name, self.op = name, op
        self.input_quantizer = TensorQuantizer(act_spec, f"{name}.input", role="activation")
        self.other_quantizer = TensorQuantizer(act_spec, f"{name}.other", role="activation")

        # As QuantMixin.exact_integer: eval mode sums the integer products exactly.
        self.exact_integer = True

    def integer_form(self) -> bool:
        """Eval mode with both operands statically quantized per tensor: the integer form."""
        quantizers = (self.input_quantizer, self.other_quantizer)
        return (
            not self.training
            and self.exact_integer
            and all(
                isinstance(q, TensorQuantizer) and q.mode == "quantize" and q.spec.per_tensor
                for q in quantizers
            )
        )

    def forward(self, x: Tensor, other: Tensor) -> Tensor:
        if self.integer_form():
            # Integer operands, their products summed exactly (float64 holds every int32 sum),
            # then one float32 scaling: what the runtime's integer matmul computes. The float
            # form below differs by float rounding, which the quantizers after it can amplify.
            x_int, other_int = (
                _centered_integers(v, q)
                for v, q in ((x, self.input_quantizer), (other, self.other_quantizer))
            )
            scale = (self.input_quantizer.scale * self.other_quantizer.scale).reshape(()).float()
            return torch.matmul(x_int.double(), other_int.double()).float() * scale
        return torch.matmul(self.input_quantizer(x), self.other_quantizer(other))


def _centered_integers(x: Tensor, q: TensorQuantizer) -> Tensor:
    """x on q's per-tensor grid as integers minus the zero point (division as ONNX Runtime's
    QuantizeLinear does it)."""
    zp = q.zero_point.reshape(()).float()
    return torch.clamp(torch.round(x / q.scale.reshape(())) + zp, q.spec.qmin, q.spec.qmax) - zp


class QuantScaledDotProductAttention(nn.Module):
    """F.scaled_dot_product_attention written out, with its two matmuls quantized: scores =
    (Q·Kᵀ) x scale, the mask, softmax (float), dropout, P·V. Same arguments as the function."""

    def __init__(self, act_spec: QuantSpec, name: str) -> None:
        super().__init__()
        self.layer_name = name
        self.qk = QuantMatMul(act_spec, f"{name}.qk", "scaled_dot_product_attention Q·Kᵀ")
        self.pv = QuantMatMul(act_spec, f"{name}.pv", "scaled_dot_product_attention P·V")

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        if scale is None:
            scale = 1.0 / float(query.size(-1)) ** 0.5
        if enable_gqa and key.size(-3) != query.size(-3):
            repeat = query.size(-3) // key.size(-3)
            key = key.repeat_interleave(repeat, -3)
            value = value.repeat_interleave(repeat, -3)
        scores = self.qk(query, key.transpose(-2, -1)) * scale
        if is_causal:
            keep = torch.ones(
                query.size(-2), key.size(-2), dtype=torch.bool, device=scores.device
            ).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        p = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:  # as the function does: dropout whenever dropout_p > 0
            p = torch_F.dropout(p, dropout_p)
        return self.pv(p, value)


# float type -> quantized type; one line to add a layer type (STYLE §11).
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
}


def from_float(
    module: nn.Module,
    weight_spec: QuantSpec | None,
    act_spec: QuantSpec | None,
    name: str,
    bn: nn.Module | None = None,
) -> nn.Module:
    """A quantized copy of `module` (BatchNorm `bn` folded in when given). The original is untouched."""
    qcls = QUANT_MODULES.get(type(module))
    if qcls is None:
        raise TypeError(f"layer {name!r}: no quantized version of {type(module).__name__}")
    weight, bias = cast(Tensor, module.weight), cast("Tensor | None", getattr(module, "bias", None))
    if bn is not None:
        weight, bias = fold_batchnorm(weight, bias, bn)  # type: ignore[arg-type]
    kwargs: dict[str, Any]
    if isinstance(module, nn.Embedding):
        new = qcls(
            module.num_embeddings,
            module.embedding_dim,
            padding_idx=module.padding_idx,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
        )
        act_spec = None  # indices are not quantized
    elif isinstance(module, nn.Linear):
        new = qcls(module.in_features, module.out_features, bias=bias is not None)
    else:
        conv: Any = module
        kwargs = dict(
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=bias is not None,
            padding_mode=conv.padding_mode,
        )
        new = qcls(conv.in_channels, conv.out_channels, conv.kernel_size, **kwargs)
    layer = cast(QuantMixin, new)
    _new_params(layer, weight, bias)
    layer._init_quant(weight_spec, act_spec, name)
    new.train(module.training)
    return new.to(device=weight.device)
