"""Following a model's ops for the check: a torch.fx trace (with shapes from example_inputs when
given), or forward hooks on its modules when fx cannot trace it."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import torch
import torch.fx.passes.shape_prop
import torch.nn.functional as F
from torch import nn

from edgequant.batches import call_model, naming_the_batch, removing_hooks, split_inputs
from edgequant.check.ops import (
    ADAPTIVE_MAX_POOL_FUNCTIONS,
    ADAPTIVE_MAX_POOL_MODULES,
    BLOCKS,
    INTEGER_FUNCTIONS,
    INTEGER_METHODS,
    INTEGER_MODULES,
    NAMED_FUNCTIONS,
    NAMED_METHODS,
    NAMED_MODULES,
    SHAPE_QUERIES,
    WHOLE_WINDOWS_ONLY,
    ZERO_CONSTANT_FUNCTIONS,
    ZERO_CONSTANT_METHODS,
    ZEROS,
    module_op,
    pool_windows,
)
from edgequant.check.result import CheckResult, op_row, uneven_pool_row
from edgequant.check.tracer import shape_trace


def nearest_upsample(m: nn.Module) -> bool:
    return isinstance(m, nn.Upsample) and m.mode == "nearest"


def classify_fx(
    node: torch.fx.Node, modules: dict[str, nn.Module]
) -> tuple[str | None, str | None]:
    """(integer op kind, None) or (None, non-integer op name) or (None, None): not an op."""
    if node.op == "call_function" and node.target is F.interpolate:
        mode = node.kwargs.get("mode", node.args[4] if len(node.args) > 4 else "nearest")
        return ("upsample (nearest)", None) if mode == "nearest" else (None, f"upsample ({mode})")
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if m is None:
            return None, None
        if nearest_upsample(m):
            return "upsample (nearest)", None
        for types, name in ((INTEGER_MODULES, None),):
            kind = types.get(type(m))
            if kind is not None:
                return kind, name
        return None, module_op(m)
    if node.op == "call_function":
        if node.target in ZERO_CONSTANT_FUNCTIONS:
            return ZEROS, None
        if node.target in INTEGER_FUNCTIONS:
            return INTEGER_FUNCTIONS[node.target], None
        if node.target in NAMED_FUNCTIONS:
            return None, NAMED_FUNCTIONS[node.target]
        if node.target is getattr:
            return None, None
        return None, getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        target = str(node.target)
        if target in SHAPE_QUERIES:
            return None, None
        if target in ZERO_CONSTANT_METHODS:
            return ZEROS, None
        if target in INTEGER_METHODS:
            return INTEGER_METHODS[target], None
        if target in NAMED_METHODS:
            return None, NAMED_METHODS[target]
        return None, target
    return None, None


def adaptive_max_pool(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, Any] | None:
    """(op name, output size) of a call of an adaptive max pool (function or module), else None."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        spatial = ADAPTIVE_MAX_POOL_MODULES.get(type(m)) if m is not None else None
        return None if spatial is None else (f"adaptive_max_pool{spatial}d", m.output_size)  # type: ignore[union-attr]
    if node.op == "call_function" and node.target in ADAPTIVE_MAX_POOL_FUNCTIONS:
        spatial = ADAPTIVE_MAX_POOL_FUNCTIONS[node.target]
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return f"adaptive_max_pool{spatial}d", size
    return None


def _node_label(node: torch.fx.Node) -> str:
    """A module call's path; a function call's node name, with the layer it was called in."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    layer = str(list(stack.values())[-1][0]) if stack else ""
    return f"{layer} ({node.name})" if layer else node.name


def refuse_uneven_pool(
    node: torch.fx.Node, modules: dict[str, nn.Module], result: CheckResult
) -> bool:
    """On a target whose files have no adaptive max pool: a row refusing `node` if it is one
    whose windows differ in size (True), or a note where the shapes are unknown."""
    pool = adaptive_max_pool(node, modules)
    if pool is None or result.target not in WHOLE_WINDOWS_ONLY:
        return False
    op, output_size = pool
    source = node.args[0] if node.args else None
    meta = source.meta.get("tensor_meta") if isinstance(source, torch.fx.Node) else None
    spatial = int(op[-2])
    if meta is None or isinstance(output_size, torch.fx.Node):
        result.notes.append(
            f"{op} at {_node_label(node)!r}: {result.target} exports it only where each input "
            "size is a whole multiple of its output size; pass example_inputs so that check "
            "can tell"
        )
        return False
    sizes = [int(d) for d in meta.shape[-spatial:]]
    if pool_windows(sizes, output_size) is not None:
        return False
    result.rows.append(uneven_pool_row(_node_label(node), op, sizes, output_size, result.target))
    return True


def is_tensor_node(node: torch.fx.Node, memo: dict[torch.fx.Node, bool]) -> bool:
    """Does node produce a tensor (not a size, an int, a tuple of sizes)? With shape
    propagation, from its metadata; otherwise from what it is made of."""
    if node in memo:
        return memo[node]
    if "type" in node.meta:  # set by ShapeProp
        memo[node] = isinstance(node.meta["type"], type) and issubclass(
            node.meta["type"], torch.Tensor
        )
        return memo[node]
    if node.op in ("placeholder", "call_module", "get_attr"):
        result = True
    elif (
        node.op == "call_method"
        and node.target in SHAPE_QUERIES
        or node.op == "call_function"
        and node.target is getattr
    ):
        result = False
    elif node.op in ("call_function", "call_method"):
        inputs = [a for a in node.all_input_nodes]
        result = any(is_tensor_node(a, memo) for a in inputs)
    else:
        result = False
    memo[node] = result
    return result


def check_fx(model: nn.Module, example_inputs: Any, result: CheckResult) -> None:
    gm = shape_trace(model)
    if example_inputs is not None:
        args, kwargs = split_inputs(example_inputs)
        if not kwargs:
            try:
                # ShapeProp prints the traceback of a failing op to stderr before it raises;
                # the note below says what failed, in one line.
                with contextlib.redirect_stderr(io.StringIO()):
                    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*args)
            except Exception as err:  # shapes only sharpen the check; name it and go on
                # ShapeProp wraps the op's error ("mat1 and mat2 shapes cannot be multiplied"):
                # show the cause, which is what tells a user that example_inputs do not fit.
                cause = err.__cause__ or err
                result.notes.append(
                    f"the model failed on example_inputs ({type(cause).__name__}: "
                    f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}), "
                    "so quantizing it on such inputs will fail too; without shapes, tensor "
                    "ops were told apart from shape arithmetic by their inputs"
                )
    modules = dict(gm.named_modules())
    memo: dict[torch.fx.Node, bool] = {}
    fully = result.fully_integer
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        # A module call is computation even when it returns a tuple (attention's (out, weights)).
        if node.op != "call_module" and not is_tensor_node(node, memo):
            continue
        kind, other = classify_fx(node, modules)
        if kind is not None and kind.startswith("batchnorm"):
            source = node.args[0] if node.args else None
            if not (
                isinstance(source, torch.fx.Node)
                and source.op == "call_module"
                and isinstance(modules.get(str(source.target)), (nn.Conv1d, nn.Conv2d, nn.Linear))
                and len(source.users) == 1
            ):
                kind, other = None, "batch_norm"
        if kind == "maxpool" and refuse_uneven_pool(node, modules, result):
            continue
        if kind is not None:
            result.integer_ops[kind] = result.integer_ops.get(kind, 0) + 1
            continue
        if other is None:
            continue
        at_output = any(u.op == "output" for u in node.users)
        label = str(node.target) if node.op == "call_module" else node.name
        result.rows.append(op_row(label, other, fully, result.target, at_output))


def check_hooks(model: nn.Module, example_inputs: Any, result: CheckResult) -> None:
    seen: list[tuple[str, nn.Module]] = []
    shapes: dict[str, list[int]] = {}  # each module's first input's shape, for the pools
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: Any, out: Any) -> None:
            seen.append((name, mod))
            if inputs and isinstance(inputs[0], torch.Tensor):
                shapes[name] = [int(d) for d in inputs[0].shape]

        return fn

    # A module that computes with its children's parameters without calling them (attention
    # reads out_proj's weight) is one op: hook it, not what is inside.
    opaque = [
        n
        for n, m in model.named_modules()
        if n and list(m.children()) and (type(m) in NAMED_MODULES or isinstance(m, BLOCKS))
    ]
    for name, m in model.named_modules():
        if not name or any(name.startswith(f"{o}.") for o in opaque):
            continue
        if name in opaque or not list(m.children()):
            hooks.append(m.register_forward_hook(hook(name)))
    with (
        removing_hooks(hooks),
        torch.no_grad(),
        naming_the_batch(example_inputs, "example_inputs"),
    ):
        call_model(model, example_inputs)
    last = seen[-1][0] if seen else None
    for name, m in dict(seen).items():
        spatial = ADAPTIVE_MAX_POOL_MODULES.get(type(m))
        if spatial and result.target in WHOLE_WINDOWS_ONLY and name in shapes:
            size = getattr(m, "output_size", None)
            if pool_windows(shapes[name][-spatial:], size) is None:
                op = f"adaptive_max_pool{spatial}d"
                row = uneven_pool_row(name, op, shapes[name][-spatial:], size, result.target)
                result.rows.append(row)
                continue
        kind = "upsample (nearest)" if nearest_upsample(m) else INTEGER_MODULES.get(type(m))
        if kind is not None:
            result.integer_ops[kind] = result.integer_ops.get(kind, 0) + 1
            continue
        other = module_op(m)
        result.rows.append(op_row(name, other, result.fully_integer, result.target, name == last))
