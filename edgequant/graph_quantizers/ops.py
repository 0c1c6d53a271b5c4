"""The fx graph as place_graph_quantizers reads it: which node is a ReLU, an activation folded
into the next quantizer, data movement, an average or a join; where a layer's output is
quantized; inserting a quantizer after a node."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import nn

from edgequant.graph_quantizers.pools import WindowMaxPool, window_max_pool
from edgequant.modules import QuantMixin
from edgequant.quantizer import TensorQuantizer


def all_but(q: torch.fx.Node) -> Callable[[torch.fx.Node], bool]:
    """delete_user_cb for Node.replace_all_uses_with: every user except q (the new node)."""
    return lambda u: u is not q


def is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    return False


ADDS = {operator.add, torch.add}


def zero_pad(node: torch.fx.Node) -> bool:
    """F.pad in constant mode with value 0 (None is F.pad's default, 0)."""
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and value in (None, 0, 0.0)


MOVES_FUNCTIONS = {operator.getitem, torch.nn.functional.pad, torch.flatten, torch.reshape}


MOVES_METHODS = {"view", "reshape", "flatten", "permute", "contiguous", "transpose", "__getitem__"}


# --- fully integer targets (TARGETS[...].fully_integer) -------------------------------------
# Ops an integer runtime runs on quantized tensors, by how their output is quantized.

_F = torch.nn.functional


ACTIVATION_FUNCTIONS = {_F.relu6, _F.hardtanh, torch.clamp, torch.clip}


ACTIVATION_METHODS = {"relu6", "clamp", "clip", "clamp_", "clip_"}


ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)


# Averages: the output is re-quantized on its own grid.
AVG_FUNCTIONS = {
    _F.avg_pool1d,
    _F.avg_pool2d,
    _F.adaptive_avg_pool1d,
    _F.adaptive_avg_pool2d,
    torch.mean,
}


AVG_METHODS = {"mean"}


AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


# Pass-through: the output takes the input's grid (every value is one of the input's values).
PASS_FUNCTIONS = MOVES_FUNCTIONS | {
    _F.max_pool1d,
    _F.max_pool2d,
    _F.adaptive_max_pool1d,
    _F.adaptive_max_pool2d,
    window_max_pool,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
}


PASS_METHODS = MOVES_METHODS | {"squeeze", "unsqueeze"}


PASS_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    WindowMaxPool,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
)


CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


SHAPE_QUERIES = {"size", "dim", "numel", getattr}


def is_activation(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """ReLU, ReLU6, hardtanh or a clamp to constant bounds: what a fully integer runtime folds
    into the clamp of the requantization that follows (the quantizer's range)."""
    if is_relu(node, modules):
        return True
    bounds = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(b, torch.fx.Node) for b in bounds):
        return False
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), ACTIVATION_MODULES)
    return False


def output_tail(
    node: torch.fx.Node, modules: dict[str, nn.Module], fully_integer: bool
) -> torch.fx.Node:
    """Where node's output is quantized: after the ReLU that alone reads it (after a chain of
    activations on fully integer targets)."""
    tail = node
    while len(tail.users) == 1:
        user = next(iter(tail.users))
        if not (is_activation(user, modules) if fully_integer else is_relu(user, modules)):
            break
        tail = user
        if not fully_integer:
            break
    return tail


def edge_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """How a fully integer target quantizes this node's output: "avg" (own grid), "pass" (the
    input's grid), "concat" (own grid, inputs rescaled), "add" (own grid), "activation"."""
    if _windowed_pool1d(node, modules):
        return "pass"
    if node.op == "call_function":
        if node.target is _F.pad and not zero_pad(node):
            return None
        if node.target is _F.interpolate:  # nearest: every value is one of the input's
            mode = node.kwargs.get("mode", node.args[4] if len(node.args) > 4 else "nearest")
            return "pass" if mode == "nearest" else None
        if node.target in ADDS:
            return "add"
        for kind, targets in (
            ("avg", AVG_FUNCTIONS),
            ("pass", PASS_FUNCTIONS),
            ("concat", CONCAT_FUNCTIONS),
        ):
            if node.target in targets:
                return kind
    elif node.op == "call_method":
        if node.target == "add":
            return "add"
        if node.target in AVG_METHODS:
            return "avg"
        if node.target in PASS_METHODS:
            return "pass"
    elif node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, nn.Upsample):
            return "pass" if m.mode == "nearest" else None
        for kind, types in (("avg", AVG_MODULES), ("pass", PASS_MODULES)):
            if isinstance(m, types):
                return kind
    return "activation" if is_activation(node, modules) else None


def _windowed_pool1d(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node averages windows of a 1-d signal (avg_pool1d, adaptive_avg_pool1d to more
    than one value). Such a pool keeps its input's grid on fully integer targets: TFLite runs it
    as AVERAGE_POOL_2D, whose input and output share one grid, and litert-torch moves any
    requantization in front of it, which rounds other values than a pool on the input grid."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, nn.AvgPool1d):
            return True
        return isinstance(m, nn.AdaptiveAvgPool1d) and m.output_size not in (1, (1,))
    if node.op != "call_function":
        return False
    if node.target is _F.avg_pool1d:
        return True
    if node.target is _F.adaptive_avg_pool1d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size not in (1, (1,), [1])
    return False


def insert_output_quantizer(
    gm: torch.fx.GraphModule,
    modules: dict[str, nn.Module],
    holder: nn.Module,
    after: torch.fx.Node,
    name: str,
    quantizer: TensorQuantizer,
) -> torch.fx.Node:
    """quantizer as output_quantizers.<name>, applied to `after`'s output for all its users."""
    holder.add_module(name, quantizer)
    path = f"output_quantizers.{name}"
    modules[path] = quantizer
    with gm.graph.inserting_after(after):
        qnode = gm.graph.call_module(path, (after,))
    after.replace_all_uses_with(qnode, delete_user_cb=all_but(qnode))
    return qnode


def quant_layer(node: torch.fx.Node, modules: dict[str, nn.Module]) -> QuantMixin | None:
    """The quantized layer a node calls (one with an input quantizer), else None."""
    m = modules.get(str(node.target)) if node.op == "call_module" else None
    return m if isinstance(m, QuantMixin) and m.input_quantizer is not None else None


def calls_quantizer(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), TensorQuantizer)
