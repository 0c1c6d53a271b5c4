"""Which ops of a quantized model would compute in float in a `.tflite`, named with their layers
before any conversion: a `.tflite` for LiteRT and TFLite Micro is fully integer, and a model
quantized for a target that leaves float ops between or after its quantized layers
(`tflite-int8`, `onnxruntime`, ...) has some. The common one: such targets keep the model's
output (the logits) in float, and TFLite's int8 kernels write int8 tensors only, so the last
layer has no exact form; `mcu-int8` quantizes that edge too."""

from __future__ import annotations

import torch
from torch import nn

from edgequant.export.lower import ExportError
from edgequant.export.pt2e import describe_node, export_program, node_op, pt2e_model

# Ops that move or select values, or clamp them at a bound (ReLU, ReLU6) or take the largest:
# quantize(op(x)) == op(quantize(x)) on one grid, so a float value that only passes through them
# before a quantize node is still a quantized value (the converter folds them).
PASS_THROUGH = frozenset(
    {
        "aten.view",
        "aten.reshape",
        "aten.flatten",
        "aten.permute",
        "aten.transpose",
        "aten.squeeze",
        "aten.unsqueeze",
        "aten.contiguous",
        "aten.clone",
        "aten.slice",
        "aten.relu",
        "aten.relu_",
        "aten.relu6",
        "aten.hardtanh",
        "aten.clamp",
        "aten.max_pool1d",
        "aten.max_pool2d",
        "getitem",
    }
)
QUANTIZE = frozenset(
    {"quantized_decomposed.quantize_per_tensor", "quantized_decomposed.quantize_per_channel"}
)
DEQUANTIZE = frozenset(
    {"quantized_decomposed.dequantize_per_tensor", "quantized_decomposed.dequantize_per_channel"}
)


def _float_end(node: torch.fx.Node) -> torch.fx.Node | None:
    """The first reader of node's value, through pass-through ops, that is not a quantize
    node (the output node, or an op computing on the float value); None when every path ends
    in one."""
    for user in node.users:
        op = node_op(user)
        if op in QUANTIZE:
            continue
        if op in PASS_THROUGH:
            end = _float_end(user)
            if end is not None:
                return end
            continue
        return user
    return None


def float_ops(program: torch.export.ExportedProgram) -> list[str]:
    """'op (layer) writes ...' for every op of the program whose result reaches the model's
    output, or another op, without being quantized, in graph order."""
    found = []
    for node in program.graph.nodes:
        op = node_op(node)
        if not op or op in QUANTIZE or op in DEQUANTIZE or op in PASS_THROUGH:
            continue
        end = _float_end(node)
        if end is None:
            continue
        if end.op == "output":
            found.append(f"{describe_node(node)} writes the model's output in float")
        else:
            found.append(f"{describe_node(node)} feeds {describe_node(end)} in float")
    return found


def not_fully_integer(qmodel: nn.Module, target: str, one: tuple[torch.Tensor, ...]) -> str:
    """Why qmodel, quantized for `target` (not fully integer), has no .tflite: the ops that
    would compute in float, each with its layer (from torch.export of the PT2E form: no
    conversion), and what to quantize with instead."""
    head = (
        f"qmodel was quantized for target {target or 'onnxruntime'!r}, which leaves float ops "
        "between or after its quantized layers, and a .tflite for LiteRT and TFLite Micro is "
        "fully integer (TFLite's int8 kernels write int8 tensors only)"
    )
    fix = (
        "quantize with recipe.for_target('mcu-int8'): the same int8 grids, every activation "
        "edge quantized, the outputs included"
    )
    try:
        found = float_ops(export_program(pt2e_model(qmodel), one))
    except ExportError as err:  # the refusal still stands; say why the ops are not named
        return f"{head} (its ops could not be listed: {err}); {fix}"
    if not found:
        return f"{head}; {fix}"
    more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
    return f"{head}: " + "; ".join(found[:5]) + f"{more}; {fix}"
