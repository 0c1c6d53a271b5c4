"""Quantizers placed by the model's graph (torch.fx), for what module swapping cannot see: the
inputs of residual adds and concatenations, the outputs a hardware target wants quantized, and
on fully integer targets every activation edge between layers."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from edgequant.check.tracer import ShapeTracer
from edgequant.graph_quantizers.edges import (
    quantize_fully_integer,
    quantize_joins,
)
from edgequant.graph_quantizers.ops import (
    all_but,
    calls_quantizer,
    edge_kind,
    insert_output_quantizer,
    output_tail,
    quant_layer,
)
from edgequant.graph_quantizers.pools import adaptive_max_pools_as_windows
from edgequant.graph_quantizers.zeros import cats_with_zeros_as_pads
from edgequant.modules import QuantMatMul, QuantMixin, QuantScaledDotProductAttention
from edgequant.quantizer import TensorQuantizer
from edgequant.spec import QuantSpec
from edgequant.summary import Summary
from edgequant.targets import TARGETS


class _QuantTracer(ShapeTracer):
    """Keeps quantized layers and quantizers as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaves = (QuantMixin, TensorQuantizer, QuantMatMul, QuantScaledDotProductAttention)
        return isinstance(m, leaves) or super().is_leaf_module(m, qualname)


def place_graph_quantizers(qmodel: nn.Module, summary: Summary) -> nn.Module:
    """Quantize each activation tensor once, where integer runtimes need it, as ONNX Runtime's
    own quantizer does:

    1. A tensor read by a quantized layer *and* by something else (a residual shortcut, a second
       layer) is quantized once, by that layer's input quantizer, and every reader takes the
       quantized tensor; the layers that read it share that quantizer.
    2. A quantized layer's output (after its ReLU, if one follows) that is not then quantized by
       a reader gets an output quantizer.
    3. Residual adds read quantized tensors and their outputs are quantized (quantize_joins).
    4. Fully integer targets (mcu-int8) only: every activation edge is quantized, so that the
       export has no float op between the input's QuantizeLinear and the output's
       DequantizeLinear: the model's outputs; average pooling (output on its own grid); max
       pooling and data movement (re-quantized with the input's quantizer: the same grid, no
       value changes); concatenation (own grid, each input rescaled); ReLU/ReLU6/clamp after a
       layer, add or pool belong to the quantizer that follows them (its range is theirs, and
       the export drops them where that is exact). A layer reading a quantized tensor shares
       its quantizer.

    Rules 1-3 let the runtime keep layers in integer kernels: DequantizeLinear -> Conv [-> Relu] ->
    QuantizeLinear becomes QLinearConv, and an Add of two dequantized tensors whose result is
    quantized becomes QLinearAdd; without them those layers run in float. Needs a model that
    torch.fx can trace; otherwise the model is returned unchanged and the summary says so.
    """
    try:
        graph = _QuantTracer().trace(qmodel)
    except Exception as err:  # tracing fails in many ways on dynamic Python; the model still works
        summary.notes.append(
            "activations quantized at layer inputs only: torch.fx could not trace the "
            f"model ({type(err).__name__}), so outputs and shared tensors are not quantized, "
            "and the ops between quantized layers (softmax, normalization, residual adds) run "
            "in float; matmuls of two activations are quantized apart from the graph "
            "(recipe.quantize_attention)"
        )
        return qmodel
    gm = torch.fx.GraphModule(qmodel, graph, class_name=type(qmodel).__name__)
    target = TARGETS.get(summary.target)
    fully_integer = target is not None and target.fully_integer
    modules = dict(gm.named_modules())
    # Folded BatchNorms are Identity now: take them out, so a ReLU is seen right after its conv.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    padded = cats_with_zeros_as_pads(gm) + adaptive_max_pools_as_windows(gm, modules)
    holder = nn.Module()
    gm.add_module("output_quantizers", holder)

    def is_quantizer(node: torch.fx.Node) -> bool:
        return calls_quantizer(node, modules)

    shared = _share_input_quantizers(gm, modules)
    added = _add_output_quantizers(gm, modules, holder, fully_integer)
    joined = quantize_joins(gm, modules, holder, is_quantizer, fully_integer)
    edges = 0
    if fully_integer:
        edges = quantize_fully_integer(gm, modules, holder, shared, summary)
    if not added and not shared and not joined and not edges and not padded:
        return qmodel
    gm.graph.lint()
    gm.recompile()
    for record in summary.layers:
        if record.name in added:
            record.output = "quantized"
        if record.name in shared:
            record.activation += " (input tensor quantized once, shared with its other readers)"
    return gm


def _share_input_quantizers(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> list[str]:
    """Rule 1: a tensor a quantized layer reads with others is quantized once, by that layer's
    input quantizer; a layer reading an already quantized tensor shares its quantizer. Returns
    the layers that now share."""
    shared: list[str] = []
    for node in list(gm.graph.nodes):
        layer = quant_layer(node, modules)
        if layer is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        if calls_quantizer(source, modules):
            # Another layer's quantizer already quantized this tensor: use its scale.
            layer.input_quantizer = cast(TensorQuantizer, modules[str(source.target)])
            layer.shared_input = True
            shared.append(str(node.target))
            continue
        if len(source.users) < 2:
            continue
        path = f"{node.target}.input_quantizer"
        with gm.graph.inserting_after(source):
            qnode = gm.graph.call_module(path, (source,))
        source.replace_all_uses_with(qnode, delete_user_cb=all_but(qnode))
        modules[path] = cast(TensorQuantizer, layer.input_quantizer)
        layer.shared_input = True
        shared.append(str(node.target))
    return shared


def _output_spec(tail: torch.fx.Node, modules: dict[str, nn.Module], own: QuantSpec) -> QuantSpec:
    """The grid of a layer's output quantizer: the layer's input grid, or that of the quantized
    layer that reads the output through pooling and data movement alone (a CNN's last conv ->
    pool -> flatten -> classifier) where that one has more bits. The reader re-quantizes the
    tensor on its own grid anyway; a coarser grid before it would only throw away what the
    reader keeps (the first and last layers at 8 bits keep the classifier's input at 8 bits),
    and an integer runtime holds either in the same 8-bit container."""
    node = tail
    while len(node.users) == 1:
        user = next(iter(node.users))
        reader = quant_layer(user, modules)
        if reader is not None:
            assert reader.input_quantizer is not None
            wider = reader.input_quantizer.spec
            return wider if wider.bits > own.bits else own
        if edge_kind(user, modules) not in ("avg", "pass"):
            break
        node = user
    return own


def _add_output_quantizers(
    gm: torch.fx.GraphModule, modules: dict[str, nn.Module], holder: nn.Module, fully_integer: bool
) -> list[str]:
    """Rule 2: a quantized layer's output (after its ReLU) that no reader quantizes gets an
    output quantizer on the layer's input grid. Returns the layers given one."""
    added = []
    for node in list(gm.graph.nodes):
        layer = quant_layer(node, modules)
        if layer is None:
            continue
        tail = output_tail(node, modules, fully_integer)
        users = list(tail.users)
        if all(
            calls_quantizer(u, modules)
            or (
                quant_layer(u, modules) is not None
                and not getattr(quant_layer(u, modules), "shared_input", False)
            )
            for u in users
        ):
            continue
        if not fully_integer and any(u.op == "output" for u in users):
            continue  # the model's own output (logits) stays float
        assert layer.input_quantizer is not None  # quant_layer returns no other layers
        spec = _output_spec(tail, modules, layer.input_quantizer.spec)
        quantizer = TensorQuantizer(spec, f"{node.target}.output", role="activation")
        name = str(node.target).replace(".", "_")
        insert_output_quantizer(gm, modules, holder, tail, name, quantizer)
        added.append(str(node.target))
    return added
