"""The operator check of edgequant.check on an ONNX graph (a float export, or a QDQ one): every
node that reads or writes float data, by op type, against the target's integer ops."""

from __future__ import annotations

import os
from typing import Any

from edgequant.check import (
    ONNX_INTEGER,
    ONNX_NAMED,
    SHAPE_ONLY_ONNX,
    ZEROS,
    CheckResult,
    op_row,
    target_spec,
)
from edgequant.export.integer_graph import constant_arrays, float_tensors, load_model


def makes_zeros(node: Any, constants: dict[str, Any]) -> bool:
    """Whether a node makes a tensor of zeros from a shape, as exporters write zeros_like and
    new_zeros: ConstantOfShape of 0, or Expand of a constant 0."""
    if node.op_type == "ConstantOfShape":
        from onnx import numpy_helper

        value = next((a.t for a in node.attribute if a.name == "value"), None)
        return value is None or not numpy_helper.to_array(value).any()
    if node.op_type == "Expand" and node.input[0] in constants:
        return not constants[node.input[0]].any()
    return False


def check_onnx(path: str | os.PathLike[str], target: str) -> CheckResult:
    """The same check on an ONNX graph (a float export, or a QDQ one): every node that reads or
    writes float data, by op type."""
    spec = target_spec(target)
    model = load_model(path)
    floats = float_tensors(model)
    result = CheckResult(
        target=spec.name, fully_integer=spec.fully_integer, traced_with="ONNX graph"
    )
    outputs = {o.name for o in model.graph.output}
    constants = constant_arrays(model.graph)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        if not any(i in floats for i in node.input) and not any(o in floats for o in node.output):
            continue
        kind = ONNX_INTEGER.get(node.op_type)
        if node.op_type == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            kind = kind if mode == "nearest" else None
        if node.op_type in SHAPE_ONLY_ONNX:
            continue
        if makes_zeros(node, constants):
            kind = ZEROS
        if kind is not None:
            result.integer_ops[kind] = result.integer_ops.get(kind, 0) + 1
            continue
        op = ONNX_NAMED.get(node.op_type, node.op_type)
        at_output = any(o in outputs for o in node.output)
        result.rows.append(
            op_row(node.name or node.output[0], op, spec.fully_integer, spec.name, at_output)
        )
    return result
