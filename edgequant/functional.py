"""The math of uniform affine quantization: pure functions on tensors, no modules, no state.

Granularity is given by two arguments shared by every function here:
- axis=None: per tensor; `scale` and `zero_point` are 0-d.
- axis=k, group_size=None: per channel along dim k; `scale` has shape (x.shape[k],).
- axis=k, group_size=g: per group of g consecutive elements along dim k (ONNX's blocked
  quantization); `scale` has x's shape with dim k replaced by x.shape[k] // g.

Rounding is half to even everywhere, as ONNX QuantizeLinear and PyTorch's fake-quantize do.
`fake_quantize` *is* PyTorch's fused fake-quantize op (bit for bit, with its straight-through
gradient); `quantize`/`dequantize` use the same arithmetic (multiply by the float32 reciprocal of
the scale) so that the integers we store are the ones the simulation used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from edgequant.spec import QuantSpec

# The smallest scale we hand out: a constant or all-zero tensor still gets a valid grid.
SCALE_EPS = float(torch.finfo(torch.float32).eps)


def check_granularity(x: Tensor, axis: int | None, group_size: int | None) -> int | None:
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis")
        return None
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of shape {tuple(x.shape)}")
    axis = axis % x.dim()
    if group_size is not None and x.shape[axis] % group_size != 0:
        raise ValueError(
            f"dim {axis} of shape {tuple(x.shape)} is not divisible by group_size {group_size}"
        )
    return axis


def to_rows(x: Tensor, axis: int, group_size: int | None) -> Tensor:
    """View x as (channels or groups, elements): one row per scale."""
    moved = x.movedim(axis, 0) if group_size is None else x.movedim(axis, -1)
    if group_size is None:
        return moved.reshape(moved.shape[0], -1)
    return moved.reshape(-1, group_size)


def _from_rows(rows: Tensor, like: Tensor, axis: int, group_size: int | None) -> Tensor:
    if group_size is None:
        moved_shape = (like.shape[axis],) + tuple(s for i, s in enumerate(like.shape) if i != axis)
        return rows.reshape(moved_shape).movedim(0, axis)
    moved_shape = tuple(s for i, s in enumerate(like.shape) if i != axis) + (like.shape[axis],)
    return rows.reshape(moved_shape).movedim(-1, axis)


def scale_rows(t: Tensor, x: Tensor, axis: int, group_size: int | None) -> Tensor:
    """Scale/zero-point laid out per granularity -> flat (rows,) matching to_rows(x)."""
    if group_size is None:
        return t.reshape(-1)
    return t.movedim(axis, -1).reshape(-1)


def param_shape(
    x_shape: tuple[int, ...] | torch.Size, axis: int | None, group_size: int | None
) -> tuple[int, ...]:
    """Shape of scale/zero_point for a tensor of x_shape at the given granularity."""
    if axis is None:
        return ()
    axis = axis % len(x_shape)
    if group_size is None:
        return (x_shape[axis],)
    return tuple(s // group_size if i == axis else s for i, s in enumerate(x_shape))


def reduce_min_max(
    x: Tensor, axis: int | None = None, group_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Min and max of x per tensor, channel or group (shapes as `param_shape`)."""
    axis = check_granularity(x, axis, group_size)
    if axis is None:
        return x.min(), x.max()
    rows = to_rows(x, axis, group_size)
    mn, mx = rows.amin(dim=1), rows.amax(dim=1)
    shape = param_shape(x.shape, axis, group_size)
    if group_size is None:
        return mn.reshape(shape), mx.reshape(shape)
    moved = tuple(s for i, s in enumerate(shape) if i != axis) + (shape[axis],)
    return mn.reshape(moved).movedim(-1, axis), mx.reshape(moved).movedim(-1, axis)


def calc_qparams(
    min_val: Tensor,
    max_val: Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    pow2: bool = False,
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) that map [min_val, max_val] onto [qmin, qmax].

    The range is first widened to contain 0, so that 0 is exactly representable (zero padding,
    ReLU). Symmetric grids put 0 at the middle of the grid and map max|x| onto the largest
    positive level; pow2 rounds the scale *up* to a power of two, so nothing that fit is clipped.
    """
    min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("calc_qparams: the range holds NaN or Inf")
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        if qmin < 0:
            # signed: 0 at zero point 0; amax -> qmax (the level -2^(b-1) is used only by clipping)
            scale = amax / float(qmax)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            half = (qmax - qmin) / 2.0
            scale = amax / half
            zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int32)
        scale = torch.clamp(scale, min=SCALE_EPS)
        if pow2:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        return scale.float(), zero_point
    scale = (max_val - min_val) / float(qmax - qmin)
    scale = torch.clamp(scale, min=SCALE_EPS)
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    zero_point = qmin - torch.round(min_val / scale)
    zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int32)
    return scale.float(), zero_point


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Quantize then dequantize, with the straight-through estimator as gradient (1 inside the
    grid, 0 where clipped). This is PyTorch's fused fake-quantize op, bit for bit."""
    axis = check_granularity(x, axis, group_size)
    zero_point = zero_point.to(torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.float().reshape(()), zero_point.reshape(()), qmin, qmax
        )
    if group_size is None:
        return torch.fake_quantize_per_channel_affine(
            x, scale.float(), zero_point, axis, qmin, qmax
        )
    rows = to_rows(x, axis, group_size)
    out = torch.fake_quantize_per_channel_affine(
        rows,
        scale_rows(scale.float(), x, axis, group_size),
        scale_rows(zero_point, x, axis, group_size),
        0,
        qmin,
        qmax,
    )
    return _from_rows(out, x, axis, group_size)


def broadcast_param(t: Tensor, x: Tensor, axis: int | None, group_size: int | None) -> Tensor:
    """Scale or zero point expanded to x's shape."""
    if axis is None:
        return t.reshape(())
    if group_size is None:
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)
    return t.repeat_interleave(group_size, dim=axis)


def quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """x -> integers (int32) on the grid, round half to even, saturating."""
    axis = check_granularity(x, axis, group_size)
    inv_scale = torch.reciprocal(broadcast_param(scale.float(), x, axis, group_size))
    zp = broadcast_param(zero_point.to(torch.int32), x, axis, group_size)
    # Saturate before the cast: a float -> int cast out of range is undefined (x86 turns huge
    # values into INT64_MIN, i.e. qmin instead of qmax); 2^31 is far outside any grid here.
    q = torch.clamp(torch.round(x.float() * inv_scale), -(2.0**31), 2.0**31).to(torch.int64) + zp
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Integers -> float32: (q - zero_point) * scale."""
    axis = check_granularity(q, axis, group_size)
    zp = broadcast_param(zero_point.to(torch.int32), q, axis, group_size)
    return (q.to(torch.int32) - zp).float() * broadcast_param(scale.float(), q, axis, group_size)


def dynamic_qparams(
    x: Tensor, qmin: int = 0, qmax: int = 255, per_token: bool = False
) -> tuple[Tensor, Tensor]:
    """Parameters computed from the tensor itself, exactly as ONNX DynamicQuantizeLinear (and
    ONNX Runtime's kernel) compute them: over the whole tensor, or with `per_token` over each row
    (the last dimension; one scale and zero point per token, shaped (..., 1))."""
    if per_token:
        x_min = torch.clamp(x.detach().amin(-1, keepdim=True).float(), max=0.0)
        x_max = torch.clamp(x.detach().amax(-1, keepdim=True).float(), min=0.0)
    else:
        x_min = torch.clamp(x.detach().min().float(), max=0.0)
        x_max = torch.clamp(x.detach().max().float(), min=0.0)
    if per_token:
        # A row whose range underflows the scale to 0 (all zeros, or below ~1e-43) takes scale 1,
        # as the exported graph does (export/ops.py), instead of dividing by 0.
        scale = (x_max - x_min) / float(qmax - qmin)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    else:
        scale = torch.where(
            x_max == x_min, torch.ones_like(x_max), (x_max - x_min) / float(qmax - qmin)
        )
    zero_point = torch.round(torch.clamp(qmin - x_min / scale, qmin, qmax)).to(torch.int32)
    return scale, zero_point


class _DynamicFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qmin: int, qmax: int, per_token: bool) -> Tensor:
        scale, zero_point = dynamic_qparams(x, qmin, qmax, per_token)
        # ONNX Runtime divides by the scale here (not multiply by its reciprocal).
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # The range covers the whole tensor, so nothing is clipped: the STE passes everything.
        return grad, None, None, None


def dynamic_fake_quantize(
    x: Tensor, qmin: int = 0, qmax: int = 255, per_token: bool = False
) -> Tensor:
    """Fake-quantize with parameters computed at run time (dynamic quantization), per tensor or
    per token (dynamic_qparams)."""
    out: Tensor = _DynamicFakeQuant.apply(x, qmin, qmax, per_token)
    return out


def nbits_block_size(in_features: int, group_size: int | None) -> int | None:
    """The block along the input of a Linear in ONNX Runtime's MatMulNBits form: the weight's
    group size (a power of two >= 16), or for per-output-channel weights the largest of 128, 64,
    32, 16 dividing `in_features`; None where there is no such block."""
    if group_size is not None:
        ok = group_size >= 16 and not group_size & (group_size - 1)
        return group_size if ok and in_features % group_size == 0 else None
    for size in (128, 64, 32, 16):
        if in_features % size == 0:
            return size
    return None


def nbits_form_missing(spec: QuantSpec, in_features: int) -> str:
    """Why a Linear weight (out, in) on the grid `spec` with `in_features` inputs has no form in
    ONNX Runtime's MatMulNBits (its blocked low-bit matmul); "" where it has one. The one rule
    that both the weight-only PTQ (which Linears get int8 inputs per block) and the LM export
    (which Linears it packs) apply, so that they cannot disagree."""
    if spec.granularity == "tensor":
        return (
            "per-tensor weights (MatMulNBits takes per-output-channel scales or groups of inputs)"
        )
    if spec.granularity == "channel" and spec.axis not in (0, -2):
        return (
            f"per-channel weights along axis {spec.axis}, not the outputs (MatMulNBits takes "
            "per-output-channel scales, axis 0)"
        )
    if spec.granularity == "group" and spec.axis not in (1, -1):
        return (
            f"groups along axis {spec.axis}, not the inputs (MatMulNBits takes groups of inputs, "
            "axis 1)"
        )
    if spec.bits > 8 or 4 < spec.bits < 8:
        return (
            f"{spec.bits}-bit weights have no MatMulNBits container (4-bit ones hold <= 4 bits; "
            "8-bit ones 8)"
        )
    if nbits_block_size(in_features, spec.group_size) is None:
        if spec.group_size is not None:
            return (
                f"group size {spec.group_size} is not a power of two >= 16 dividing the input "
                f"size {in_features} (MatMulNBits' blocks)"
            )
        return f"input size {in_features} is not a multiple of 16 (MatMulNBits' smallest block)"
    return ""


def nbits_form(spec: QuantSpec, in_features: int) -> int | None:
    """The block along the inputs of a Linear's MatMulNBits form (nbits_block_size) where its
    weight grid `spec` has one, else None (nbits_form_missing says why)."""
    if nbits_form_missing(spec, in_features):
        return None
    return nbits_block_size(in_features, spec.group_size)


def block_int8_fake_quantize(x: Tensor, block: int) -> Tensor:
    """x rounded to int8 at run time per row of the last dim and per block of `block` elements
    along it, symmetric, as ONNX Runtime's MatMulNBits computes its input at accuracy_level=4
    (MLAS' int8 compute type): scale = amax / 127, codes = round-half-to-even(x * (127 / amax)),
    0 for an all-zero block; then dequantized (codes x scale). The straight-through estimator
    passes the gradient."""
    k = x.shape[-1]
    if block < 1 or k % block:
        raise ValueError(
            f"block_int8_fake_quantize: the last dim ({k}) is not a multiple of block {block}"
        )
    out: Tensor = _BlockInt8FakeQuant.apply(x, block)
    return out


class _BlockInt8FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, block: int) -> Tensor:
        rows = x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
        amax = rows.abs().amax(dim=-1, keepdim=True)
        scale = amax / 127.0
        # A multiply by the reciprocal (as MLAS does), not a division by the scale.
        inverse = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.clamp(torch.round(rows * inverse), -127, 127)
        return (q * scale).reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def dynamic_quantized_linear(
    x: Tensor,
    weight_q_t: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    qmin: int = 0,
    qmax: int = 255,
    per_token: bool = False,
) -> Tensor:
    """y = x @ W^T + bias with x quantized at run time, exactly as ONNX Runtime computes
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) -> Add(bias).

    per_token (a scale and zero point per row of x, export/ops.py): as ONNX Runtime's fused
    MatMulIntegerToFloat computes the product of the codes with a per-row scale, in this order,
    ((float(codes @ W) * w_scale) * x_scale), then minus the rows' zero points times the
    weight's column sums, (x_zp * x_scale) * (colsum(W) * w_scale), then plus the bias.

    weight_q_t: integer weights laid out (in_features, out_features); weight_scale: per output
    channel or scalar (symmetric weights, zero point 0). The integer product is exact (float64
    holds every int32 sum) and the scaling is float32, so this matches the runtime bit for bit
    rather than to within float rounding, which a deep network would amplify into flipped steps.
    """
    scale, zero_point = dynamic_qparams(x, qmin, qmax, per_token)
    codes = torch.clamp(torch.round(x.detach() / scale) + zero_point, qmin, qmax)
    w_scale = weight_scale.float().reshape(-1)
    if per_token:
        acc = torch.matmul(codes.double(), weight_q_t.double())
        col_sums = weight_q_t.double().sum(0).float() * w_scale
        y = (acc.float() * w_scale) * scale - (zero_point.float() * scale) * col_sums
    else:
        acc = torch.matmul((codes - zero_point).double(), weight_q_t.double())
        y = acc.float() * (scale * w_scale)
    return y + bias if bias is not None else y


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    reference, test = reference.double(), test.double()
    noise = (reference - test).pow(2).sum()
    signal = reference.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
