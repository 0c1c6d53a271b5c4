"""Quantizers placed by the model's graph (torch.fx), for what module swapping cannot see: the
inputs of residual adds and concatenations, the outputs a hardware target wants quantized, and
on fully integer targets every activation edge between layers."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from edgequant.modules import QuantMixin
from edgequant.quantizer import TensorQuantizer
from edgequant.spec import QuantSpec
from edgequant.summary import Summary
from edgequant.targets import TARGETS


class _QuantTracer(torch.fx.Tracer):
    """Keeps quantized layers and quantizers as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantMixin, TensorQuantizer)) or super().is_leaf_module(m, qualname)


def _all_but(q: torch.fx.Node) -> Callable[[torch.fx.Node], bool]:
    """delete_user_cb for Node.replace_all_uses_with: every user except q (the new node)."""
    return lambda u: u is not q


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    return False


_ADDS = {operator.add, torch.add}


def _zero_pad(node: torch.fx.Node) -> bool:
    """F.pad in constant mode with value 0 (None is F.pad's default, 0)."""
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and value in (None, 0, 0.0)


_MOVES_FUNCTIONS = {operator.getitem, torch.nn.functional.pad, torch.flatten, torch.reshape}

_MOVES_METHODS = {"view", "reshape", "flatten", "permute", "contiguous", "transpose", "__getitem__"}


def _quantize_joins(
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
        if not (node.op == "call_function" and node.target in _ADDS) and not (
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
                (src.op == "call_function" and src.target in _MOVES_FUNCTIONS)
                or (src.op == "call_method" and src.target in _MOVES_METHODS)
            ):
                if src.target is torch.nn.functional.pad and not _zero_pad(src):
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
                step.replace_all_uses_with(qnode, delete_user_cb=_all_but(qnode))
                count += 1
        if not all(is_quantizer(a) for a in node.args if isinstance(a, torch.fx.Node)):
            continue
        tail = _tail(node, modules, fully_integer)
        users = list(tail.users)
        if all(is_quantizer(u) for u in users) or (
            not fully_integer and any(u.op == "output" for u in users)
        ):
            continue
        first_input = next(a for a in node.args if isinstance(a, torch.fx.Node))
        spec = cast(TensorQuantizer, modules[str(first_input.target)]).spec
        name = f"join_{node.name}"
        quantizer = TensorQuantizer(spec, f"{node.name}.output", role="activation")
        holder.add_module(name, quantizer)
        modules[f"output_quantizers.{name}"] = quantizer
        with gm.graph.inserting_after(tail):
            qnode = gm.graph.call_module(f"output_quantizers.{name}", (tail,))
        tail.replace_all_uses_with(qnode, delete_user_cb=_all_but(qnode))
        count += 1
    return count


# --- fully integer targets (TARGETS[...].fully_integer) -------------------------------------
# Ops an integer runtime runs on quantized tensors, by how their output is quantized.

_F = torch.nn.functional

_ACTIVATION_FUNCTIONS = {_F.relu6, _F.hardtanh, torch.clamp, torch.clip}

_ACTIVATION_METHODS = {"relu6", "clamp", "clip", "clamp_", "clip_"}

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)

# Averages: the output is re-quantized on its own grid.
_AVG_FUNCTIONS = {
    _F.avg_pool1d,
    _F.avg_pool2d,
    _F.adaptive_avg_pool1d,
    _F.adaptive_avg_pool2d,
    torch.mean,
}

_AVG_METHODS = {"mean"}

_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)

# Pass-through: the output takes the input's grid (every value is one of the input's values).
_PASS_FUNCTIONS = _MOVES_FUNCTIONS | {
    _F.max_pool1d,
    _F.max_pool2d,
    _F.adaptive_max_pool1d,
    _F.adaptive_max_pool2d,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
}

_PASS_METHODS = _MOVES_METHODS | {"squeeze", "unsqueeze"}

_PASS_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
)

_CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}

_SHAPE_QUERIES = {"size", "dim", "numel", getattr}


def _is_activation(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """ReLU, ReLU6, hardtanh or a clamp to constant bounds: what a fully integer runtime folds
    into the clamp of the requantization that follows (the quantizer's range)."""
    if _is_relu(node, modules):
        return True
    bounds = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(b, torch.fx.Node) for b in bounds):
        return False
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ACTIVATION_MODULES)
    return False


def _tail(node: torch.fx.Node, modules: dict[str, nn.Module], fully_integer: bool) -> torch.fx.Node:
    """Where node's output is quantized: after the ReLU that alone reads it (after a chain of
    activations on fully integer targets)."""
    tail = node
    while len(tail.users) == 1:
        user = next(iter(tail.users))
        if not (_is_activation(user, modules) if fully_integer else _is_relu(user, modules)):
            break
        tail = user
        if not fully_integer:
            break
    return tail


def _edge_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """How a fully integer target quantizes this node's output: "avg" (own grid), "pass" (the
    input's grid), "concat" (own grid, inputs rescaled), "add" (own grid), "activation"."""
    if node.op == "call_function":
        if node.target is _F.pad and not _zero_pad(node):
            return None
        if node.target is _F.interpolate:  # nearest: every value is one of the input's
            mode = node.kwargs.get("mode", node.args[4] if len(node.args) > 4 else "nearest")
            return "pass" if mode == "nearest" else None
        if node.target in _ADDS:
            return "add"
        for kind, targets in (
            ("avg", _AVG_FUNCTIONS),
            ("pass", _PASS_FUNCTIONS),
            ("concat", _CONCAT_FUNCTIONS),
        ):
            if node.target in targets:
                return kind
    elif node.op == "call_method":
        if node.target == "add":
            return "add"
        if node.target in _AVG_METHODS:
            return "avg"
        if node.target in _PASS_METHODS:
            return "pass"
    elif node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, nn.Upsample):
            return "pass" if m.mode == "nearest" else None
        for kind, types in (("avg", _AVG_MODULES), ("pass", _PASS_MODULES)):
            if isinstance(m, types):
                return kind
    return "activation" if _is_activation(node, modules) else None


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
        name = f"edge_{label}"
        quantizer = TensorQuantizer(spec, f"{label}.output", role="activation")
        holder.add_module(name, quantizer)
        path = f"output_quantizers.{name}"
        modules[path] = quantizer
        with gm.graph.inserting_after(after):
            qnode = gm.graph.call_module(path, (after,))
        after.replace_all_uses_with(qnode, delete_user_cb=_all_but(qnode))
        return qnode

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
        kind = _edge_kind(node, modules)
        if kind is None or not node.args:
            continue
        first = node.args[0]
        if kind in ("activation", "pass") and not (
            isinstance(first, torch.fx.Node) and is_quantizer(first)
        ):
            # An activation on a layer's output is that output quantizer's range; data
            # movement of something not quantized (a size tuple, a float tensor) is not ours.
            continue
        if kind == "concat":
            if not isinstance(first, (list, tuple)):
                continue
            inputs: list[Any] = list(first)
        elif kind == "add":
            inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if len(inputs) != 2:
                continue
        else:
            inputs = [first]
        qinputs = [quantized(a) for a in inputs]
        if any(q is None for q in qinputs):
            continue
        spec = cast(TensorQuantizer, modules[str(cast(torch.fx.Node, qinputs[0]).target)]).spec
        tail = node if kind == "pass" else _tail(node, modules, True)
        users = list(tail.users)
        if users and all(is_quantizer(u) for u in users):
            continue
        if kind == "pass":
            source = cast(torch.fx.Node, qinputs[0])
            with gm.graph.inserting_after(node):
                qnode = gm.graph.call_module(str(source.target), (node,))
            node.replace_all_uses_with(qnode, delete_user_cb=_all_but(qnode))
        else:
            new_quantizer(tail, spec, node.name)
        count += 1
    left = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or is_quantizer(node):
            continue
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), QuantMixin):
            continue
        if _edge_kind(node, modules) is not None or node.target in _SHAPE_QUERIES:
            continue
        if any(isinstance(a, torch.fx.Node) and is_quantizer(a) for a in node.args):
            if node.op == "call_module":
                target = type(modules[str(node.target)]).__name__
            else:
                target = node.target if isinstance(node.target, str) else node.target.__name__
            left.append(f"{node.name} ({target})")
    return count, left


def place_graph_quantizers(qmodel: nn.Module, summary: Summary) -> nn.Module:
    """Quantize each activation tensor once, where integer runtimes need it, as ONNX Runtime's
    own quantizer does:

    1. A tensor read by a quantized layer *and* by something else (a residual shortcut, a second
       layer) is quantized once, by that layer's input quantizer, and every reader takes the
       quantized tensor; the layers that read it share that quantizer.
    2. A quantized layer's output (after its ReLU, if one follows) that is not then quantized by
       a reader gets an output quantizer.
    3. Residual adds read quantized tensors and their outputs are quantized (_quantize_joins).
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
            "and the ops between quantized layers (matmuls of two activations such as "
            "attention's QK^T and attn x V, softmax, normalization, residual adds) run in float"
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
    holder = nn.Module()
    gm.add_module("output_quantizers", holder)

    def quant_layer(node: torch.fx.Node) -> QuantMixin | None:
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        return m if isinstance(m, QuantMixin) and m.input_quantizer is not None else None

    def is_quantizer(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(
            modules.get(str(node.target)), TensorQuantizer
        )

    shared: list[str] = []
    for node in list(gm.graph.nodes):
        layer = quant_layer(node)
        if layer is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        if is_quantizer(source):
            # Another layer's quantizer already quantized this tensor: use its scale.
            layer.input_quantizer = modules[str(source.target)]
            layer.shared_input = True
            shared.append(str(node.target))
            continue
        if len(source.users) < 2:
            continue
        path = f"{node.target}.input_quantizer"
        with gm.graph.inserting_after(source):
            qnode = gm.graph.call_module(path, (source,))
        source.replace_all_uses_with(qnode, delete_user_cb=_all_but(qnode))
        modules[path] = layer.input_quantizer
        layer.shared_input = True
        shared.append(str(node.target))

    added = []
    for node in list(gm.graph.nodes):
        layer = quant_layer(node)
        if layer is None:
            continue
        tail = _tail(node, modules, fully_integer)
        users = list(tail.users)
        if all(
            is_quantizer(u)
            or (quant_layer(u) is not None and not getattr(quant_layer(u), "shared_input", False))
            for u in users
        ):
            continue
        if not fully_integer and any(u.op == "output" for u in users):
            continue  # the model's own output (logits) stays float
        name = str(node.target).replace(".", "_")
        assert layer.input_quantizer is not None  # quant_layer returns no other layers
        quantizer = TensorQuantizer(
            layer.input_quantizer.spec, f"{node.target}.output", role="activation"
        )
        holder.add_module(name, quantizer)
        modules[f"output_quantizers.{name}"] = quantizer
        with gm.graph.inserting_after(tail):
            qnode = gm.graph.call_module(f"output_quantizers.{name}", (tail,))
        tail.replace_all_uses_with(qnode, delete_user_cb=_all_but(qnode))
        added.append(str(node.target))
    joined = _quantize_joins(gm, modules, holder, is_quantizer, fully_integer)
    edges = 0
    if fully_integer:
        default_spec = next(
            (
                m.input_quantizer.spec
                for m in modules.values()
                if isinstance(m, QuantMixin) and m.input_quantizer is not None
            ),
            None,
        )
        edges, left_float = _quantize_every_edge(gm, modules, holder, is_quantizer, default_spec)
        # A layer whose input is now a quantized tensor reads it as it is (one rounding, and
        # the layer's INT32 bias on that tensor's scale).
        for node in gm.graph.nodes:
            layer = quant_layer(node)
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
    if not added and not shared and not joined and not edges:
        return qmodel
    gm.graph.lint()
    gm.recompile()
    for record in summary.layers:
        if record.name in added:
            record.output = "quantized"
        if record.name in shared:
            record.activation += " (input tensor quantized once, shared with its other readers)"
    return gm
