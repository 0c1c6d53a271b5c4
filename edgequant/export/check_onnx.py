"""The operator check of edgequant.check on an ONNX graph (a float export, or a QDQ one): every
node that reads or writes float data, by op type, against the target's integer ops."""

from __future__ import annotations

import os

from edgequant.check import (
    ONNX_INTEGER,
    ONNX_NAMED,
    SHAPE_ONLY_ONNX,
    CheckResult,
    op_row,
    target_spec,
)
from edgequant.export.integer_graph import float_tensors, load_model


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
        if kind is not None:
            result.integer_ops[kind] = result.integer_ops.get(kind, 0) + 1
            continue
        op = ONNX_NAMED.get(node.op_type, node.op_type)
        at_output = any(o in outputs for o in node.output)
        result.rows.append(
            op_row(node.name or node.output[0], op, spec.fully_integer, spec.name, at_output)
        )
    return result
