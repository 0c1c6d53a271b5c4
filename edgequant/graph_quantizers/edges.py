"""Rules 3 and 4 of place_graph_quantizers: the inputs and outputs of residual adds, and on fully
integer targets every activation edge between integer ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from edgequant.graph_quantizers.ops import (
    ADDS,
    MOVES_FUNCTIONS,
    MOVES_METHODS,
    SHAPE_QUERIES,
    all_but,
    calls_quantizer,
    edge_kind,
    insert_output_quantizer,
    output_tail,
    quant_layer,
    zero_pad,
)
from edgequant.graph_quantizers.zeros import is_zeros, zero_pads
from edgequant.modules import QuantMixin
from edgequant.quantizer import TensorQuantizer
from edgequant.spec import QuantSpec
from edgequant.summary import Summary


def quantize_joins(
    gm: torch.fx.GraphModule,
    modules: dict[str, nn.Module],
    holder: nn.Module,
    is_quantizer: Any,
    fully_integer: bool = False,
) -> int:
    """Rule 3 of place_graph_quantizers: the inputs of a residual add are quantized tensors.

    An input that reaches the add only through data movement (strided slices, zero padding,
    reshapes) of a quantized tensor is re-quantized with that same quantizer, which changes no
    value but lets the runtime keep the slice, the pad and the add in integers. If every input
    is then quantized, the add's output (after its ReLU) gets a quantizer unless a reader has one.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in ADDS) and not (
            node.op == "call_method" and node.target == "add"
        ):
            continue
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(inputs) != 2:
            continue
        for arg in inputs:
            if is_quantizer(arg):
                continue
            src = arg
            chain: list[torch.fx.Node] = []
            while not is_quantizer(src) and (
                (src.op == "call_function" and src.target in MOVES_FUNCTIONS)
                or (src.op == "call_method" and src.target in MOVES_METHODS)
            ):
                if src.target is torch.nn.functional.pad and not zero_pad(src):
                    break
                first = src.args[0]
                if not isinstance(first, torch.fx.Node):
                    break
                chain.append(src)
                src = first
            if src is arg or not is_quantizer(src):
                continue
            # After every data-movement step, not only the last: ONNX Runtime then finds each
            # Slice/Pad between a DequantizeLinear and a QuantizeLinear of the same scale and
            # runs it on integers, instead of propagating QDQ pairs itself (its propagation
            # mislabels signed zero points in ORT 1.32).
            for step in reversed(chain):
                with gm.graph.inserting_after(step):
                    qnode = gm.graph.call_module(str(src.target), (step,))
                step.replace_all_uses_with(qnode, delete_user_cb=all_but(qnode))
                count += 1
        if not all(is_quantizer(a) for a in node.args if isinstance(a, torch.fx.Node)):
            continue
        tail = output_tail(node, modules, fully_integer)
        users = list(tail.users)
        if all(is_quantizer(u) for u in users) or (
            not fully_integer and any(u.op == "output" for u in users)
        ):
            continue
        first_input = next(a for a in node.args if isinstance(a, torch.fx.Node))
        spec = cast(TensorQuantizer, modules[str(first_input.target)]).spec
        quantizer = TensorQuantizer(spec, f"{node.name}.output", role="activation")
        insert_output_quantizer(gm, modules, holder, tail, f"join_{node.name}", quantizer)
        count += 1
    return count


def _edge_inputs(node: torch.fx.Node, kind: str) -> list[Any] | None:
    """The tensors an integer op of this kind reads (None: not one we quantize): a
    concatenation's list, an add's two operands, else the first argument."""
    first = node.args[0]
    if kind == "concat":
        return list(first) if isinstance(first, (list, tuple)) else None
    if kind == "add":
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        return inputs if len(inputs) == 2 else None
    return [first]


def _left_float(
    gm: torch.fx.GraphModule,
    modules: dict[str, nn.Module],
    is_quantizer: Callable[[torch.fx.Node], bool],
) -> list[str]:
    """The ops that read a quantized tensor and have no integer form ("name (op)")."""
    left = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or is_quantizer(node):
            continue
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), QuantMixin):
            continue
        if edge_kind(node, modules) is not None or node.target in SHAPE_QUERIES:
            continue
        if is_zeros(node) or node.target is zero_pads:  # shapes read, no value computed
            continue
        if any(isinstance(a, torch.fx.Node) and is_quantizer(a) for a in node.args):
            if node.op == "call_module":
                target = type(modules[str(node.target)]).__name__
            else:
                target = node.target if isinstance(node.target, str) else node.target.__name__
            left.append(f"{node.name} ({target})")
    return left


def _quantize_every_edge(
    gm: torch.fx.GraphModule,
    modules: dict[str, nn.Module],
    holder: nn.Module,
    is_quantizer: Callable[[torch.fx.Node], bool],
    default_spec: QuantSpec | None,
) -> tuple[int, list[str]]:
    """Rule 4 of place_graph_quantizers (fully integer targets): every activation edge between
    integer ops carries a quantized tensor. Returns (quantizers placed, ops left in float)."""
    count = 0

    def new_quantizer(after: torch.fx.Node, spec: QuantSpec, label: str) -> torch.fx.Node:
        quantizer = TensorQuantizer(spec, f"{label}.output", role="activation")
        return insert_output_quantizer(gm, modules, holder, after, f"edge_{label}", quantizer)

    def quantized(arg: Any) -> torch.fx.Node | None:
        """arg as a quantized tensor: a graph input or a module's output gets a quantizer."""
        if not isinstance(arg, torch.fx.Node):
            return None
        if is_quantizer(arg):
            return arg
        if default_spec is not None and arg.op in ("placeholder", "call_module"):
            return new_quantizer(arg, default_spec, arg.name)
        return None

    for node in list(gm.graph.nodes):
        kind = edge_kind(node, modules)
        if kind is None or not node.args:
            continue
        first = node.args[0]
        if kind in ("activation", "pass") and not (
            isinstance(first, torch.fx.Node) and is_quantizer(first)
        ):
            # An activation on a layer's output is that output quantizer's range; data
            # movement of something not quantized (a size tuple, a float tensor) is not ours.
            continue
        inputs = _edge_inputs(node, kind)
        if inputs is None:
            continue
        qinputs = [quantized(a) for a in inputs]
        if any(q is None for q in qinputs):
            continue
        spec = cast(TensorQuantizer, modules[str(cast(torch.fx.Node, qinputs[0]).target)]).spec
        tail = node if kind == "pass" else output_tail(node, modules, True)
        users = list(tail.users)
        if users and all(is_quantizer(u) for u in users):
            continue
        if kind == "pass":
            source = cast(torch.fx.Node, qinputs[0])
            with gm.graph.inserting_after(node):
                qnode = gm.graph.call_module(str(source.target), (node,))
            node.replace_all_uses_with(qnode, delete_user_cb=all_but(qnode))
        else:
            new_quantizer(tail, spec, node.name)
        count += 1
    left = _left_float(gm, modules, is_quantizer)
    return count, left


def _concat_inputs_on_output_grid(
    gm: torch.fx.GraphModule, modules: dict[str, nn.Module], holder: nn.Module
) -> int:
    """A layer output that only a concatenation reads is quantized straight onto the
    concatenation's grid, not onto its own and then rescaled (two roundings): TFLite requires one
    grid for a CONCATENATION's inputs and output, and its converter writes such a layer's output
    on that grid. Returns how many quantizers now use the concatenation's."""
    count = 0
    for node in gm.graph.nodes:
        if edge_kind(node, modules) != "concat" or len(node.users) != 1:
            continue
        out = next(iter(node.users))
        inputs = _edge_inputs(node, "concat")
        if not calls_quantizer(out, modules) or inputs is None:
            continue
        for arg in inputs:
            if not (
                isinstance(arg, torch.fx.Node)
                and calls_quantizer(arg, modules)
                and len(arg.users) == 1
                and arg.target != out.target
                and str(arg.target).startswith("output_quantizers.")
            ):
                continue
            producer = arg.args[0]
            if not (isinstance(producer, torch.fx.Node) and quant_layer(producer, modules)):
                continue
            old = str(arg.target)
            arg.target = out.target
            if not any(n.op == "call_module" and n.target == old for n in gm.graph.nodes):
                delattr(holder, old.split(".", 1)[1])
                del modules[old]
            count += 1
    return count


def quantize_fully_integer(
    gm: torch.fx.GraphModule,
    modules: dict[str, nn.Module],
    holder: nn.Module,
    shared: list[str],
    summary: Summary,
) -> int:
    """Rule 4 (fully integer targets): every edge quantized, then each layer reading a quantized
    tensor shares its quantizer (added to `shared`); the summary notes what stayed float.
    Returns the edges quantized."""

    def is_quantizer(node: torch.fx.Node) -> bool:
        return calls_quantizer(node, modules)

    default_spec = next(
        (
            m.input_quantizer.spec
            for m in modules.values()
            if isinstance(m, QuantMixin) and m.input_quantizer is not None
        ),
        None,
    )
    edges, left_float = _quantize_every_edge(gm, modules, holder, is_quantizer, default_spec)
    _concat_inputs_on_output_grid(gm, modules, holder)
    # A layer whose input is now a quantized tensor reads it as it is (one rounding, and
    # the layer's INT32 bias on that tensor's scale).
    for node in gm.graph.nodes:
        layer = quant_layer(node, modules)
        if layer is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        if is_quantizer(source) and not layer.shared_input:
            layer.input_quantizer = cast(TensorQuantizer, modules[str(source.target)])
            layer.shared_input = True
            shared.append(str(node.target))
    summary.notes.append(
        f"target {summary.target} is fully integer: {edges} activation edges quantized "
        "besides layer inputs and outputs (adds, pooling, concatenation, data movement)"
    )
    if left_float:
        summary.notes.append(
            "ops with no integer form left in float (the export will not be fully integer; "
            "see edgequant check): " + ", ".join(left_float)
        )
    return edges
