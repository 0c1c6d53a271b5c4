"""Passes on an exported ONNX graph: pack INT4 constants, put back the requantization ONNX
Runtime would insert wrongly, drop what a runtime does not read (provenance, value info,
default attributes), count the integer weights, and the exact-kernel copy that verification
runs on CPUs whose int8 kernel saturates. Each takes a ModelProto and changes no value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from edgequant.export import ops
from edgequant.export.int8_kernels import can_saturate
from edgequant.export.lower import ExportError
from edgequant.export.names import fresh_name


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
    graph = model.graph
    consts = _constants(graph)
    names = {n.name for n in graph.node}
    values = {v for n in graph.node for v in (*n.input, *n.output)} | set(consts)
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
            or not _signed_per_tensor(source, consts)
        ):
            continue
        out = node.output[0]
        readers = [n for n in nodes if out in n.input]
        if out not in outputs and all(r.op_type == "QuantizeLinear" for r in readers):
            continue
        quantize, dequantize = _requantize_pair(node, source, readers, values, names)
        nodes[index:index] = [quantize, dequantize]
        producer[node.output[0]], producer[quantize.output[0]], producer[out] = (
            node,
            quantize,
            dequantize,
        )
        index += 2
        inserted += 1
    if inserted:
        del graph.node[:]
        graph.node.extend(nodes)
    return inserted


def _signed_per_tensor(dq: Any, consts: dict[str, Any]) -> bool:
    """Whether a DequantizeLinear reads a constant per-tensor INT8 zero point."""
    from onnx import TensorProto

    if len(dq.input) < 3 or not dq.input[2] or dq.input[2] not in consts:
        return False
    zero_point = consts[dq.input[2]]
    return zero_point.data_type == TensorProto.INT8 and math.prod(zero_point.dims) == 1


def _requantize_pair(
    node: Any, source: Any, readers: list[Any], values: set[str], names: set[str]
) -> tuple[Any, Any]:
    """A QuantizeLinear/DequantizeLinear pair on `source`'s grid after `node`, wired in.

    The op now writes `moved`; the new DequantizeLinear writes the old name, so every reader
    (and a graph output) keeps its input; QuantizeLinear readers take `moved` directly.
    """
    from onnx import helper

    out = node.output[0]
    moved = fresh_name(f"{out}_moved", values)
    requantized = fresh_name(f"{out}_requantized", values)
    node.output[0] = moved
    for reader in readers:
        if reader.op_type == "QuantizeLinear":
            reader.input[0] = moved
    scale, zero_point = source.input[1], source.input[2]
    quantize = helper.make_node(
        "QuantizeLinear",
        [moved, scale, zero_point],
        [requantized],
        name=fresh_name(f"{node.name or out}_requantize", names),
    )
    dequantize = helper.make_node(
        "DequantizeLinear",
        [requantized, scale, zero_point],
        [out],
        name=fresh_name(f"{node.name or out}_dequantize", names),
    )
    return quantize, dequantize


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
    """Remove the shape and type annotations of intermediate values (runtimes infer them; a few
    percent of a small file); return how many were removed."""
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
        if node.op_type in ("MatMulInteger", "MatMulIntegerToFloat") and node.input[1] in consts:
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
    Verification on such a CPU runs this copy (tests/export/test_int8_kernels.py checks
    it against ONNX Runtime's reference kernels); the file keeps the target's INT8 weights.
    """
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
