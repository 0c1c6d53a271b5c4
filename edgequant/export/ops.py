"""Custom ops that carry quantization through torch.export, and their ONNX translations.

The stock exporters cannot export fake-quantize (DESIGN §4): the TorchScript exporter rejects
narrow ranges and bits other than 8, the dynamo exporter fails on aten.fake_quantize_*. So the
lowered model calls these ops instead; each computes exactly what the simulation computed, and
its onnxscript translation emits the standard ONNX ops that compute the same.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edgequant import functional as F

# ONNX TensorProto data types, by (bits container, signed)
ONNX_INT4, ONNX_UINT4 = 22, 21
ONNX_FLOAT = 1
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
ONNX_UINT8, ONNX_INT32 = 2, 6


def _axis(axis: int) -> int | None:
    return None if axis < 0 else axis


def _block(block_size: int) -> int | None:
    return None if block_size <= 0 else block_size


@torch.library.custom_op("edgequant::qdq", mutates_args=())
def qdq(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    clip_lo: Tensor,
    clip_hi: Tensor,
    qmin: int,
    qmax: int,
    axis: int,
    container_bits: int,
    clip: bool,
) -> Tensor:
    """Fake-quantize an activation (per tensor or per axis). axis=-1: per tensor."""
    return F.fake_quantize(x, scale, zero_point.to(torch.int32), qmin, qmax, _axis(axis))


# The fake (meta) kernels give only the output's shape and dtype, for torch.export's tracing; the
# schema comes from the op itself, so they take the op's arguments as they come.
def _like_input(x: Tensor, *_: object) -> Tensor:
    return torch.empty_like(x)


qdq.register_fake(_like_input)


@torch.library.custom_op("edgequant::quantize_int", mutates_args=())
def quantize_int(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    one: Tensor,
    clip_lo: Tensor,
    clip_hi: Tensor,
    qmin: int,
    qmax: int,
    container_bits: int,
    clip: bool,
) -> Tensor:
    """x on the integer grid, as integer-valued floats q - zero_point (per tensor)."""
    zp = zero_point.to(torch.float32).reshape(())
    return torch.clamp(torch.round(x / scale.reshape(())) + zp, qmin, qmax) - zp


quantize_int.register_fake(_like_input)


@torch.library.custom_op("edgequant::dq", mutates_args=())
def dq(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    axis: int,
    block_size: int,
    container_bits: int,
    zero_point_is_zero: bool,
) -> Tensor:
    """Dequantize stored integers (weights, biases). axis=-1: per tensor; block_size>0: blocked."""
    return F.dequantize(q, scale, zero_point.to(torch.int32), _axis(axis), _block(block_size))


@dq.register_fake
def _(q: Tensor, *_: object) -> Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("edgequant::dynamic_linear", mutates_args=())
def dynamic_linear(
    x: Tensor,
    weight_t_q: Tensor,
    weight_zero_point: Tensor,
    weight_scale: Tensor,
    bias: Tensor,
    has_bias: bool,
    per_token: bool,
) -> Tensor:
    """y = dynamic_fake_quantize(x) @ dequantize(W)^T + bias, as DynamicQuantizeLinear +
    MatMulInteger + scale multiply compute it (per_token: each row quantized by ONNX ops, then
    ONNX Runtime's fused MatMulIntegerToFloat, _per_token_matmul). weight_t_q: (in, out)
    integers, uint8 with weight_zero_point 128 for symmetric int8 weights
    (export.int8_kernels.as_uint8)."""
    w = weight_t_q.to(torch.int32) - weight_zero_point.to(torch.int32)
    return F.dynamic_quantized_linear(
        x, w, weight_scale, bias if has_bias else None, per_token=per_token
    )


@dynamic_linear.register_fake
def _(x: Tensor, weight_t_q: Tensor, *_: object) -> Tensor:
    return torch.empty(x.shape[:-1] + (weight_t_q.shape[1],), dtype=x.dtype, device=x.device)


def translation_table() -> dict[object, object]:
    """onnxscript translations of the ops above, for torch.onnx.export(custom_translation_table=)."""
    return {
        torch.ops.edgequant.qdq.default: _qdq_onnx,
        torch.ops.edgequant.dq.default: _dq_onnx,
        torch.ops.edgequant.quantize_int.default: _quantize_int_onnx,
        torch.ops.edgequant.dynamic_linear.default: _dynamic_linear_onnx,
    }


# The translations import onnxscript's opset where they run (a light `import edgequant`). Any:
# onnxscript's opsets constrain their inputs by type variables (T1_Cast, ...), which the
# untyped symbolic values passed through here cannot be checked against.


def _container(t: Any, container_bits: int, signed: bool) -> Any:
    """Integers below 8 bits travel as int8/uint8 buffers and are cast to INT4/UINT4 here; the
    exporter folds these casts into packed INT4 initializers."""
    from onnxscript import opset21 as op

    if container_bits == 4:
        return op.Cast(t, to=ONNX_INT4 if signed else ONNX_UINT4)
    return t


def _qdq_onnx(
    x,
    scale,
    zero_point,
    clip_lo,
    clip_hi,
    qmin: int,
    qmax: int,
    axis: int,
    container_bits: int,
    clip: bool,
):
    from onnxscript import opset21 as op

    zp = _container(zero_point, container_bits, qmin < 0)
    if clip:
        # The grid is narrower than its container (3 bits in INT4, narrow range): clip in
        # float first, so QuantizeLinear's saturation is the grid's own.
        x = op.Clip(x, clip_lo, clip_hi)
    if axis < 0:
        q = op.QuantizeLinear(x, scale, zp)
        return op.DequantizeLinear(q, scale, zp)
    q = op.QuantizeLinear(x, scale, zp, axis=axis)
    return op.DequantizeLinear(q, scale, zp, axis=axis)


def _dq_onnx(
    q,
    scale,
    zero_point,
    axis: int,
    block_size: int,
    container_bits: int,
    zero_point_is_zero: bool,
):
    from onnxscript import opset21 as op

    signed = True  # 4-bit weights are signed grids (8-bit ones may be stored as uint8: as_uint8)
    qc = _container(q, container_bits, signed)
    if zero_point_is_zero:
        # An absent zero point is 0 of the input's type: symmetric weights and INT32 biases
        # need none, and the file is smaller without one per channel.
        if axis < 0:
            return op.DequantizeLinear(qc, scale)
        if block_size > 0:
            return op.DequantizeLinear(qc, scale, axis=axis, block_size=block_size)
        return op.DequantizeLinear(qc, scale, axis=axis)
    zp = _container(zero_point, container_bits, signed)
    if axis < 0:
        return op.DequantizeLinear(qc, scale, zp)
    if block_size > 0:
        return op.DequantizeLinear(qc, scale, zp, axis=axis, block_size=block_size)
    return op.DequantizeLinear(qc, scale, zp, axis=axis)


def _quantize_int_onnx(
    x,
    scale,
    zero_point,
    one,
    clip_lo,
    clip_hi,
    qmin: int,
    qmax: int,
    container_bits: int,
    clip: bool,
):
    from onnxscript import opset21 as op

    # QuantizeLinear, then DequantizeLinear with scale 1: the integers, as floats, which a
    # float Conv/MatMul sums exactly (every partial sum of such a layer is below 2^24).
    zp = _container(zero_point, container_bits, qmin < 0)
    if clip:
        x = op.Clip(x, clip_lo, clip_hi)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), one, zp)


def _per_token_quantize(rows):
    # functional.dynamic_qparams(per_token=True) on the input seen as (rows, features): UINT8, a
    # scale and zero point per row, quantized by one QuantizeLinear per axis 0; scale and zero
    # point come back 1-D. Fewer nodes than the reference form, the same codes: a row whose
    # range is 0 (all zeros) takes the smallest float32 as its scale instead of 1 (its codes and
    # products are 0 either way), and the zero point is not clipped (-x_min / scale is in
    # [0, 255] already: x_min <= 0 <= x_max).
    from onnxscript import opset21 as op

    zero = op.Constant(value_float=0.0)
    axis = op.Constant(value_ints=[1])
    x_min = op.Min(op.ReduceMin(rows, axis, keepdims=0), zero)
    x_max = op.Max(op.ReduceMax(rows, axis, keepdims=0), zero)
    step = op.Div(op.Sub(x_max, x_min), op.Constant(value_float=255.0))
    scale = op.Max(step, op.Constant(value_float=_SMALLEST_FLOAT32))
    x_zp = op.Round(op.Div(op.Neg(x_min), scale))
    q = op.QuantizeLinear(rows, scale, op.Cast(x_zp, to=ONNX_UINT8), axis=0)
    return q, scale, x_zp


_SMALLEST_FLOAT32 = float(np.finfo(np.float32).smallest_subnormal)


@functools.lru_cache(maxsize=1)
def _matmul_integer_to_float() -> Any:
    """ONNX Runtime's com.microsoft MatMulIntegerToFloat as an onnxscript op: onnx registers no
    schema for contrib ops, so the translation carries its own (inputs as ONNX Runtime's
    contrib-op documentation lists them)."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulIntegerToFloat",
        MS_DOMAIN,
        1,
        inputs=[
            param("A", "T1"),
            param("B", "T2"),
            param("a_scale", "T3"),
            param("b_scale", "T3"),
            param("a_zero_point", "T1", param_option=optional),
            param("b_zero_point", "T2", param_option=optional),
            param("bias", "T3", param_option=optional),
        ],
        outputs=[param("Y", "T3")],
        type_constraints=[
            ("T1", ["tensor(uint8)", "tensor(int8)"], ""),
            ("T2", ["tensor(uint8)", "tensor(int8)"], ""),
            ("T3", ["tensor(float)"], ""),
        ],
    )
    return Op(Opset(MS_DOMAIN, 1), "MatMulIntegerToFloat", schema)


def _per_token_matmul(x, weight_t_q, weight_zero_point, weight_scale):
    # One fused MatMulIntegerToFloat on the input seen as (rows, features): the codes (with their
    # zero points) times the weight, scaled per column and then per row, ((acc * w_scale) *
    # x_scale); its zero points must be scalars, so the rows' zero points come off afterwards in
    # float, (x_zp * x_scale) * (colsum(W) * w_scale), a constant ONNX Runtime folds when it
    # loads the file; then the rows take the input's leading shape again. Its bias input is not
    # used: with a per-row scale ONNX Runtime 1.20-1.32 scales the bias too. The shapes of the
    # weight are constants ONNX Runtime folds, so the input's reshape is one node.
    from onnx import numpy_helper
    from onnxscript import opset21 as op

    features = op.Shape(weight_t_q, start=0, end=1)
    rows = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), features, axis=0))
    xq, x_scale, x_zp = _per_token_quantize(rows)
    column = op.Constant(value_ints=[1])
    u8_zero = op.Constant(value=numpy_helper.from_array(np.array(0, dtype=np.uint8)))
    # Dynamic layers' weights are symmetric: one zero point (0, or 128 for uint8 storage).
    w_zp = op.ReduceMax(weight_zero_point, keepdims=0)
    y = _matmul_integer_to_float()(
        xq, weight_t_q, op.Unsqueeze(x_scale, column), weight_scale, u8_zero, w_zp
    )
    w_int = op.Sub(op.Cast(weight_t_q, to=ONNX_INT32), op.Cast(weight_zero_point, to=ONNX_INT32))
    w_sum = op.ReduceSum(w_int, op.Constant(value_ints=[0]), keepdims=0)
    col_sums = op.Mul(op.Cast(w_sum, to=ONNX_FLOAT), weight_scale)
    y = op.Sub(y, op.Mul(op.Unsqueeze(op.Mul(x_zp, x_scale), column), col_sums))
    out_shape = op.Concat(op.Shape(x, end=-1), op.Shape(weight_t_q, start=1), axis=0)
    return op.Reshape(y, out_shape)


def _dynamic_linear_onnx(
    x, weight_t_q, weight_zero_point, weight_scale, bias, has_bias: bool, per_token: bool
):
    from onnxscript import opset21 as op

    if per_token:
        y = _per_token_matmul(x, weight_t_q, weight_zero_point, weight_scale)
    else:
        xq, x_scale, x_zp = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, weight_t_q, x_zp, weight_zero_point)
        y = op.Mul(op.Cast(acc, to=ONNX_FLOAT), op.Mul(x_scale, weight_scale))
    if has_bias:
        y = op.Add(y, bias)
    return y
