"""How an ONNX graph stores each weight layer: for every Conv/Gemm/MatMul-like node, the weight
input followed back through layout ops (Transpose, Reshape, Cast, ...) to the initializer that
holds it, and the activation input back to a DequantizeLinear, if any (export/inspect.py's
report is made of these LayerInfo records).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# Nodes whose weight the report describes.
WEIGHT_OPS = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
)

# Integer matmuls (A, B, ...) and every op whose weight operand is integer itself.
_INTEGER_MATMULS = ("MatMulInteger", "MatMulIntegerToFloat")
_INTEGER_OPS = (*_INTEGER_MATMULS, "ConvInteger", "QLinearConv", "QLinearMatMul")

# Ops that move or relabel a tensor without changing what it holds; followed when tracing.
_PASSTHROUGH_OPS = frozenset(
    {"Transpose", "Reshape", "Cast", "Identity", "Flatten", "Squeeze", "Unsqueeze"}
)

_INTEGER_DTYPES = frozenset(
    {
        TensorProto.INT2,
        TensorProto.UINT2,
        TensorProto.INT4,
        TensorProto.UINT4,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT16,
        TensorProto.UINT16,
        TensorProto.INT32,
        TensorProto.UINT32,
    }
)
_FULL_FLOAT_DTYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
)
# Sub-byte dtypes: onnx packs them, so their storage is not numel * itemsize.
_SUB_BYTE_BITS: dict[int, int] = {
    TensorProto.INT2: 2,
    TensorProto.UINT2: 2,
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.FLOAT4E2M1: 4,
}

# Where a layer's weight comes from.
#   integer     DequantizeLinear of an integer initializer (or the integer operand of
#               MatMulInteger(ToFloat)/ConvInteger/QLinear*): stored quantized
#   lowp-float  DequantizeLinear of an FP8/FP4 initializer: stored quantized, not integer
#   fake-quant  QuantizeLinear -> DequantizeLinear of a float initializer: simulated only, the
#               file still stores the float weight
#   float       a float initializer (or a constant computed from initializers): not quantized
#   none        no constant operand (e.g. attention's activation x activation MatMul)
WEIGHT_SOURCES = ("integer", "lowp-float", "fake-quant", "float", "none")


def dtype_name(data_type: int) -> str:
    """ONNX's name for a TensorProto data type, e.g. 'INT4'."""
    return str(TensorProto.DataType.Name(data_type))


def dtype_bits(data_type: int) -> int:
    """Bits per element of an ONNX data type."""
    if data_type in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[data_type]
    return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize * 8)


@dataclass(frozen=True)
class LayerInfo:
    """One weight layer as stored in the file."""

    name: str
    op: str
    weight_source: str  # one of WEIGHT_SOURCES
    weight_initializer: str | None = None
    weight_dtype: str | None = None  # 'INT8', 'INT4', 'FLOAT', ...
    weight_bits: int | None = None
    weight_shape: tuple[int, ...] | None = None
    granularity: str | None = None  # 'per-tensor', 'per-axis(0)', 'blocked(32)'
    axis: int | None = None
    block_size: int | None = None
    scale_shape: tuple[int, ...] | None = None
    zero_point_zero: bool | None = None  # True when absent or all zeros
    activation: str = "float"  # 'float', 'static' (Q->DQ) or 'dynamic' (DynamicQuantizeLinear)
    activation_dtype: str | None = None
    # A matmul of two activations (attention's Q·Kᵀ, P·V): its second operand, as `activation`.
    other_activation: str | None = None
    weight_max_abs: int | None = None  # INT8 weights: the largest |value| stored

    @property
    def kernel(self) -> str:
        """The 8-bit integer kernel ONNX Runtime's CPU provider runs this layer with, and whether
        it is exact: on x86 without VNNI the s8-weight kernels sum pairs of products in int16
        (activations as uint8) and saturate unless |weight| <= 64. '' where the layer is not
        an 8-bit x 8-bit integer product."""
        if self.weight_source != "integer" or self.activation == "float" or self.weight_bits != 8:
            return ""
        codes = {"UINT8": "u8", "INT8": "s8"}
        a, w = codes.get(self.activation_dtype or ""), codes.get(self.weight_dtype or "")
        if a is None or w is None:
            return ""
        if w == "u8":
            return f"{a}u8 (exact; slower on x86)"
        if self.weight_max_abs is not None and self.weight_max_abs <= 64:
            return f"{a}s8 (exact: |w| <= 64)"
        return f"{a}s8 (saturates on x86 without VNNI: |w| > 64)"

    @property
    def quantized(self) -> bool:
        return self.weight_source in ("integer", "lowp-float")

    @property
    def has_weight(self) -> bool:
        return self.weight_source != "none"


class OnnxGraph:
    """Lookups over the main graph: producers, constants, element types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            for output in node.output:
                if output:
                    self.producer[output] = node
        self.constants: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.constants[node.output[0]] = attribute.t
        self.graph_inputs = {i.name for i in model.graph.input} - set(self.constants)
        self.elem_types: dict[str, int] = {}
        for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            if info.type.HasField("tensor_type"):
                self.elem_types[info.name] = info.type.tensor_type.elem_type
        self._inferred = False
        self._depends_memo: dict[str, bool] = {}

    def weight_nodes(self) -> Iterator[tuple[int, onnx.NodeProto]]:
        for index, node in enumerate(self.nodes):
            standard = node.domain in ("", "ai.onnx")
            contrib = node.domain == "com.microsoft" and node.op_type == "MatMulIntegerToFloat"
            if node.op_type in WEIGHT_OPS and (standard or contrib):
                yield index, node

    def trace(self, name: str) -> tuple[str, onnx.NodeProto | None]:
        """Follow `name` back through layout ops; return the name reached and its producer."""
        seen = set()
        while name not in self.constants and name not in seen:
            seen.add(name)
            node = self.producer.get(name)
            if node is None or node.op_type not in _PASSTHROUGH_OPS or not node.input:
                return name, node
            name = node.input[0]
        return name, None

    def is_constant(self, name: str) -> bool:
        """True when `name` depends on no graph input (an initializer, or computed from them)."""
        return not self._depends_on_input(name)

    def _depends_on_input(self, name: str) -> bool:
        # Iterative post-order walk: exported graphs can be deeper than Python's recursion limit.
        stack = [name]
        while stack:
            current = stack[-1]
            if current in self._depends_memo:
                stack.pop()
                continue
            if current in self.constants:
                self._depends_memo[current] = False
                stack.pop()
                continue
            node = self.producer.get(current)
            if node is None:
                # A graph input, or an outer-scope name: not constant.
                self._depends_memo[current] = current != ""
                stack.pop()
                continue
            pending = [i for i in node.input if i and i not in self._depends_memo]
            if pending:
                stack.extend(pending)
                continue
            self._depends_memo[current] = any(
                self._depends_memo.get(i, False) for i in node.input if i
            )
            stack.pop()
        return self._depends_memo[name]

    def elem_type(self, name: str) -> int | None:
        if name in self.constants:
            return self.constants[name].data_type
        if name not in self.elem_types and not self._inferred:
            self._inferred = True
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model)
            except Exception:  # inference is a nicety here; models over 2 GB or odd ops defeat it
                inferred = None
            if inferred is not None:
                for info in inferred.graph.value_info:
                    if info.type.HasField("tensor_type"):
                        self.elem_types.setdefault(info.name, info.type.tensor_type.elem_type)
        return self.elem_types.get(name) or None

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.constants[name])


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(onnx.helper.get_attribute_value(attribute))
    return default


def _weight_and_activation_indices(
    graph: OnnxGraph, node: onnx.NodeProto
) -> tuple[int | None, int]:
    """Which input holds the weight (None: no constant operand) and which the activation."""
    op = node.op_type
    if op in (*_INTEGER_MATMULS, "Conv", "ConvTranspose", "ConvInteger", "Gemm", "MatMul"):
        first, second = 0, 1
    else:  # QLinearConv, QLinearMatMul: (x, x_scale, x_zp, w, w_scale, w_zp, ...)
        first, second = 0, 3
    inputs = list(node.input)
    if len(inputs) <= second:
        return None, first
    # Conv's weight is always input 1; for MatMul-like ops either operand may be the constant.
    candidates = (second,) if op.startswith(("Conv", "QLinearConv")) else (second, first)
    for index in candidates:
        if _is_weight(graph, inputs[index]):
            return index, first if index == second else second
    return None, first


def _is_weight(graph: OnnxGraph, name: str) -> bool:
    reached, producer = graph.trace(name)
    if reached in graph.constants:
        return True
    if producer is not None and producer.op_type == "DequantizeLinear":
        return graph.is_constant(producer.input[0])
    return graph.is_constant(name)


def inspect_node(graph: OnnxGraph, index: int, node: onnx.NodeProto) -> LayerInfo:
    name = node.name or f"{node.op_type}_{index}"
    weight_index, activation_index = _weight_and_activation_indices(graph, node)
    activation, activation_dtype = _activation(graph, node, activation_index)
    base: dict[str, Any] = {
        "name": name,
        "op": node.op_type,
        "activation": activation,
        "activation_dtype": activation_dtype,
    }
    if weight_index is None:
        if node.op_type in ("MatMul", *_INTEGER_MATMULS, "QLinearMatMul") and len(node.input) > 1:
            kind, dtype = _activation(graph, node, 3 if node.op_type == "QLinearMatMul" else 1)
            base["other_activation"] = f"{kind} {dtype}" if dtype else kind
        return LayerInfo(weight_source="none", **base)
    weight_name = node.input[weight_index]
    if node.op_type in _INTEGER_OPS:
        return _integer_op_weight(graph, node, weight_index, base)

    reached, producer = graph.trace(weight_name)
    if reached in graph.constants:
        return _plain_weight(graph, reached, base)
    if producer is not None and producer.op_type == "DequantizeLinear":
        stored, stored_producer = graph.trace(producer.input[0])
        if stored in graph.constants:
            return _dequantized_weight(graph, producer, stored, base)
        if stored_producer is not None and stored_producer.op_type == "QuantizeLinear":
            source, _ = graph.trace(stored_producer.input[0])
            if source in graph.constants:
                layer = _plain_weight(graph, source, base)
                simulated = _quantize_dtype(graph, stored_producer) or "UINT8"
                return _replace(
                    layer,
                    weight_source="fake-quant",
                    weight_bits=dtype_bits(getattr(TensorProto, simulated)),
                    **_dq_params(graph, producer, layer),
                )
    # A constant computed by other ops (e.g. Mul of two initializers): stored as float somewhere.
    return LayerInfo(weight_source="float", weight_dtype=_maybe_dtype(graph, weight_name), **base)


def _replace(layer: LayerInfo, **changes: Any) -> LayerInfo:
    return LayerInfo(**{**asdict(layer), **changes})


def _maybe_dtype(graph: OnnxGraph, name: str) -> str | None:
    data_type = graph.elem_type(name)
    return dtype_name(data_type) if data_type else None


def _plain_weight(graph: OnnxGraph, initializer: str, base: dict[str, Any]) -> LayerInfo:
    tensor = graph.constants[initializer]
    integer = tensor.data_type in _INTEGER_DTYPES
    return LayerInfo(
        weight_source="integer" if integer else "float",
        weight_initializer=initializer,
        weight_dtype=dtype_name(tensor.data_type),
        weight_bits=dtype_bits(tensor.data_type),
        weight_shape=tuple(tensor.dims),
        weight_max_abs=_max_abs(graph, initializer),
        **base,
    )


def _max_abs(graph: OnnxGraph, name: str) -> int | None:
    """The largest |value| of an INT8 initializer (None for other types)."""
    tensor = graph.constants[name]
    if tensor.data_type != TensorProto.INT8:
        return None
    values = graph.array(name)
    return int(np.abs(values.astype(np.int16)).max()) if values.size else 0


def _dq_params(graph: OnnxGraph, dq: onnx.NodeProto, layer: LayerInfo) -> dict[str, Any]:
    """Granularity, scale shape and zero point of a DequantizeLinear."""
    scale_shape: tuple[int, ...] | None = None
    scale_size = 1
    if len(dq.input) > 1 and dq.input[1] in graph.constants:
        scale_shape = tuple(graph.constants[dq.input[1]].dims)
        scale_size = math.prod(scale_shape)
    rank = len(layer.weight_shape) if layer.weight_shape is not None else None
    axis = _attribute(dq, "axis", 1)
    if rank and axis < 0:
        axis += rank
    block_size = _attribute(dq, "block_size", 0)
    if scale_size == 1 and (scale_shape is None or len(scale_shape) <= 1):
        granularity, axis_out, block_out = "per-tensor", None, None
    elif block_size > 0:
        granularity, axis_out, block_out = f"blocked({block_size})", axis, block_size
    else:
        granularity, axis_out, block_out = f"per-axis({axis})", axis, None
    return {
        "granularity": granularity,
        "axis": axis_out,
        "block_size": block_out,
        "scale_shape": scale_shape,
        "zero_point_zero": _zero_point_zero(graph, dq.input[2] if len(dq.input) > 2 else ""),
    }


def _zero_point_zero(graph: OnnxGraph, name: str) -> bool | None:
    if not name:
        return True
    if name not in graph.constants:
        return None
    return bool(np.all(graph.array(name).astype(np.float64) == 0))


def _dequantized_weight(
    graph: OnnxGraph, dq: onnx.NodeProto, stored: str, base: dict[str, Any]
) -> LayerInfo:
    tensor = graph.constants[stored]
    data_type = tensor.data_type
    if data_type in _INTEGER_DTYPES:
        source = "integer"
    elif data_type in _FULL_FLOAT_DTYPES:
        source = "float"  # DequantizeLinear of a float tensor is only a rescale
    else:
        source = "lowp-float"
    layer = LayerInfo(
        weight_source=source,
        weight_initializer=stored,
        weight_dtype=dtype_name(data_type),
        weight_bits=dtype_bits(data_type),
        weight_shape=tuple(tensor.dims),
        weight_max_abs=_max_abs(graph, stored),
        **base,
    )
    return _replace(layer, **_dq_params(graph, dq, layer))


def _integer_op_weight(
    graph: OnnxGraph, node: onnx.NodeProto, weight_index: int, base: dict[str, Any]
) -> LayerInfo:
    """MatMulInteger(ToFloat)/ConvInteger/QLinearConv/QLinearMatMul: the weight operand is
    integer itself."""
    reached, _ = graph.trace(node.input[weight_index])
    if reached not in graph.constants:
        return LayerInfo(weight_source="float", weight_dtype=_maybe_dtype(graph, reached), **base)
    layer = _plain_weight(graph, reached, base)
    inputs = list(node.input)
    if node.op_type.startswith("QLinear"):
        scale_name = inputs[weight_index + 1] if len(inputs) > weight_index + 1 else ""
        zero_point_name = inputs[weight_index + 2] if len(inputs) > weight_index + 2 else ""
    elif node.op_type == "MatMulIntegerToFloat":  # (A, B, a_scale, b_scale, a_zp, b_zp, bias)
        scale_name = inputs[2 + weight_index] if len(inputs) > 2 + weight_index else ""
        zero_point_name = inputs[4 + weight_index] if len(inputs) > 4 + weight_index else ""
    else:  # (A, B, a_zero_point, b_zero_point): no scale in the op, it is applied after
        scale_name = ""
        zero_point_index = 2 + weight_index
        zero_point_name = inputs[zero_point_index] if len(inputs) > zero_point_index else ""
    # Per-channel parameters run along the output channels: axis 0 for Conv, the last for MatMul.
    if node.op_type in ("QLinearConv", "ConvInteger"):
        channel_axis = 0
    else:
        channel_axis = len(layer.weight_shape or (0, 0)) - 1
    scale_shape = tuple(graph.constants[scale_name].dims) if scale_name in graph.constants else None
    params_shape = scale_shape
    if params_shape is None and zero_point_name in graph.constants:
        params_shape = tuple(graph.constants[zero_point_name].dims)
    per_channel = params_shape is not None and math.prod(params_shape) > 1
    return _replace(
        layer,
        granularity=f"per-axis({channel_axis})" if per_channel else "per-tensor",
        axis=channel_axis if per_channel else None,
        scale_shape=scale_shape,
        zero_point_zero=_zero_point_zero(graph, zero_point_name),
    )


def _activation(graph: OnnxGraph, node: onnx.NodeProto, index: int) -> tuple[str, str | None]:
    """('float' | 'static' | 'dynamic', the quantized dtype) for the node's activation input."""
    if index >= len(node.input) or not node.input[index]:
        return "float", None
    reached, producer = graph.trace(node.input[index])
    if node.op_type in _INTEGER_OPS:
        # The operand is already integer; what produced it says static or dynamic: a
        # QuantizeLinear with stored parameters, or DynamicQuantizeLinear, or (per token) a
        # QuantizeLinear whose scales the graph computes from the input (export/ops.py).
        kind = "static"
        if producer is not None and (
            producer.op_type == "DynamicQuantizeLinear"
            or (
                producer.op_type == "QuantizeLinear"
                and len(producer.input) > 1
                and not graph.is_constant(producer.input[1])
            )
        ):
            kind = "dynamic"
        return kind, _maybe_dtype(graph, reached) or (
            "UINT8" if kind == "dynamic" else _quantize_dtype(graph, producer)
        )
    if producer is None or producer.op_type != "DequantizeLinear":
        return "float", None
    quantized, quantizer = graph.trace(producer.input[0])
    kind = (
        "dynamic"
        if quantizer is not None and quantizer.op_type == "DynamicQuantizeLinear"
        else "static"
    )
    data_type = graph.elem_type(quantized)
    if data_type is None and len(producer.input) > 2 and producer.input[2] in graph.constants:
        data_type = graph.constants[producer.input[2]].data_type
    if data_type is None:
        return kind, _quantize_dtype(graph, quantizer)
    return kind, dtype_name(data_type)


def _quantize_dtype(graph: OnnxGraph, quantizer: onnx.NodeProto | None) -> str | None:
    """The output dtype of a QuantizeLinear: its zero point's, its output_dtype, else UINT8."""
    if quantizer is None or quantizer.op_type != "QuantizeLinear":
        return None
    if len(quantizer.input) > 2 and quantizer.input[2] in graph.constants:
        return dtype_name(graph.constants[quantizer.input[2]].data_type)
    output_dtype = _attribute(quantizer, "output_dtype", 0)
    return dtype_name(output_dtype or TensorProto.UINT8)
