"""The operator check, before any calibration or training: which ops of a model a hardware target
cannot run in integer, and what to do about each (keep it in float where the target allows,
a known replacement, or refuse).

`check(model, target, example_inputs)` traces a PyTorch model with torch.fx (forward hooks on
the modules when fx cannot trace it); `export.check_onnx.check_onnx(path, target)` reads an ONNX graph. Both
return a CheckResult: one row per op instance the target cannot run in integer, and `ok`.
"""

from __future__ import annotations

import contextlib
import io
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx.passes.shape_prop
import torch.nn.functional as F
from torch import nn

from edgequant.targets import TARGETS

# What a row asks the user to do.
KEEP_FLOAT = "keep-float"  # the target's runtime runs it in float between DQ and Q
REPLACE = "replace"  # swap it for an op the target runs in integer (changes the function)
REMOVE = "remove"  # a monotonic op at the output: drop it, argmax is unchanged
REFUSE = "refuse"  # no integer form: this target cannot run the model

# --- ops every target runs in integer (the export quantizes them) ----------------------------
_INTEGER_MODULES: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Linear: "linear",
    nn.Embedding: "embedding",
    nn.BatchNorm1d: "batchnorm (folded into the layer before it)",
    nn.BatchNorm2d: "batchnorm (folded into the layer before it)",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Hardtanh: "hardtanh",
    nn.MaxPool1d: "maxpool",
    nn.MaxPool2d: "maxpool",
    nn.AdaptiveMaxPool1d: "maxpool",
    nn.AdaptiveMaxPool2d: "maxpool",
    nn.AvgPool1d: "avgpool",
    nn.AvgPool2d: "avgpool",
    nn.AdaptiveAvgPool1d: "avgpool",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.Flatten: "reshape",
    nn.Unflatten: "reshape",
    nn.Dropout: "identity (eval)",
    nn.Identity: "identity",
}
_INTEGER_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    torch.clamp: "clamp",
    torch.clip: "clamp",
    operator.add: "add",
    torch.add: "add",
    F.max_pool1d: "maxpool",
    F.max_pool2d: "maxpool",
    F.adaptive_max_pool1d: "maxpool",
    F.adaptive_max_pool2d: "maxpool",
    F.avg_pool1d: "avgpool",
    F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool1d: "avgpool",
    F.adaptive_avg_pool2d: "avgpool",
    torch.mean: "avgpool",
    torch.cat: "concat",
    torch.concat: "concat",
    torch.flatten: "reshape",
    torch.reshape: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
    torch.permute: "transpose",
    torch.transpose: "transpose",
    operator.getitem: "slice",
    F.pad: "pad",
    F.dropout: "identity (eval)",
}
_INTEGER_METHODS = {
    "relu": "relu",
    "relu_": "relu",
    "clamp": "clamp",
    "clip": "clamp",
    "add": "add",
    "mean": "avgpool",
    "view": "reshape",
    "reshape": "reshape",
    "flatten": "reshape",
    "squeeze": "reshape",
    "unsqueeze": "reshape",
    "permute": "transpose",
    "transpose": "transpose",
    "contiguous": "identity",
    "__getitem__": "slice",
}
_SHAPE_QUERIES = {"size", "dim", "numel", "shape"}

# --- ops with no integer kernel in edgequant's export, and what a fully integer target offers --
# (op name, the replacement or None, why)
_LUT = (
    "integer runtimes run it as a 256-entry int8 lookup table (TFLite); edgequant's integer "
    "export and run_integer have no lookup-table op"
)
_NOT_INTEGER: dict[str, tuple[str | None, str]] = {
    "gelu": (
        "nn.ReLU",
        "the usual integer stand-in (changes the function: fine-tune or QAT afterwards); " + _LUT,
    ),
    "silu": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "hardswish": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "mish": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "elu": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "leaky_relu": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "tanh": (
        "nn.Hardtanh(-1, 1)",
        "a clamp, folded into the quantizer's range (changes the function: fine-tune or QAT "
        "afterwards); " + _LUT,
    ),
    "sigmoid": (None, _LUT),
    "softmax": (None, "int8 softmax needs exp lookup tables; edgequant's export has none"),
    "log_softmax": (None, "int8 softmax needs exp lookup tables; edgequant's export has none"),
    "layer_norm": (
        None,
        "normalising by a data-dependent standard deviation needs an integer square root and "
        "division per sample (no int8 kernel in CMSIS-NN); a BatchNorm (folded) in its place "
        "means retraining",
    ),
    "batch_norm": (
        None,
        "not right after a conv/linear, so it cannot be folded; an integer port would run it "
        "as a per-channel multiply-add, which the export has no kernel for",
    ),
    "group_norm": (None, "per-sample normalisation: no int8 kernel (see layer_norm)"),
    "instance_norm": (None, "per-sample normalisation: no int8 kernel (see layer_norm)"),
    "mul": (None, "an elementwise product of activations: no integer kernel in the export"),
    "sub": (None, "no integer subtraction kernel in the export"),
    "div": (None, "no integer division kernel in the export"),
    "matmul": (None, "a product of two activations: no integer kernel in the export"),
    "exp": (None, "no integer kernel"),
    "pow": (None, "no integer kernel"),
    "sqrt": (None, "no integer kernel"),
    "attention": (None, "softmax and activation products: no integer kernel in the export"),
}
_MONOTONIC_AT_OUTPUT = {"softmax", "log_softmax", "sigmoid"}
# PyTorch's transformer blocks: attention, norms and activations inside one module call.
_BLOCKS = (
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)

_NAMED_MODULES: dict[type[nn.Module], str] = {
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Mish: "mish",
    nn.ELU: "elu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Softmax: "softmax",
    nn.LogSoftmax: "log_softmax",
    nn.LayerNorm: "layer_norm",
    nn.GroupNorm: "group_norm",
    nn.InstanceNorm1d: "instance_norm",
    nn.InstanceNorm2d: "instance_norm",
    nn.MultiheadAttention: "attention",
}
_NAMED_FUNCTIONS: dict[Any, str] = {
    F.gelu: "gelu",
    F.silu: "silu",
    F.hardswish: "hardswish",
    F.mish: "mish",
    F.elu: "elu",
    F.leaky_relu: "leaky_relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.log_softmax: "log_softmax",
    F.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.truediv: "div",
    torch.div: "div",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    torch.exp: "exp",
    torch.pow: "pow",
    operator.pow: "pow",
    torch.sqrt: "sqrt",
    torch.rsqrt: "sqrt",
}
_NAMED_METHODS = {
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "mul": "mul",
    "sub": "sub",
    "div": "div",
    "matmul": "matmul",
    "exp": "exp",
    "pow": "pow",
    "sqrt": "sqrt",
    "rsqrt": "sqrt",
}

# ONNX op types (for check_onnx): integer ones, then named non-integer ones.
ONNX_INTEGER = {
    "Conv": "conv",
    "Gemm": "linear",
    "MatMul": "linear",
    "Add": "add",
    "Relu": "relu",
    "Clip": "clamp",
    "MaxPool": "maxpool",
    "AveragePool": "avgpool",
    "GlobalAveragePool": "avgpool",
    "ReduceMean": "avgpool",
    "Concat": "concat",
    "Reshape": "reshape",
    "Flatten": "reshape",
    "Squeeze": "reshape",
    "Unsqueeze": "reshape",
    "Transpose": "transpose",
    "Slice": "slice",
    "Pad": "pad",
    "Resize": "upsample (nearest)",
    "Identity": "identity",
    "Dropout": "identity (eval)",
    "BatchNormalization": "batchnorm (folded into the layer before it)",
    "Gather": "embedding",
}
# ONNX ops that read only a tensor's shape: no computation on its values.
SHAPE_ONLY_ONNX = ("Shape", "Size")
ONNX_NAMED = {
    "Gelu": "gelu",
    "Erf": "gelu",
    "Sigmoid": "sigmoid",
    "HardSigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softmax": "softmax",
    "LogSoftmax": "log_softmax",
    "LayerNormalization": "layer_norm",
    "GroupNormalization": "group_norm",
    "InstanceNormalization": "instance_norm",
    "HardSwish": "hardswish",
    "Mish": "mish",
    "Elu": "elu",
    "LeakyRelu": "leaky_relu",
    "Mul": "mul",
    "Sub": "sub",
    "Div": "div",
    "Exp": "exp",
    "Pow": "pow",
    "Sqrt": "sqrt",
}


@dataclass(frozen=True)
class OpRow:
    """One op instance the target cannot run in integer."""

    node: str  # module path or graph node name
    op: str  # the op, e.g. "gelu", "layer_norm"
    action: str  # keep-float, replace, remove or refuse
    choice: str  # the choice spelled out for this target


@dataclass
class CheckResult:
    """What `check` found: the rows to act on, and what runs in integer as it is."""

    target: str
    fully_integer: bool
    rows: list[OpRow] = field(default_factory=list)
    integer_ops: dict[str, int] = field(default_factory=dict)
    traced_with: str = "torch.fx"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The model goes to the target as it is (every other op runs in integer, or in float
        where the target allows)."""
        return all(r.action == KEEP_FLOAT for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def format(self) -> str:
        kind = "fully integer" if self.fully_integer else "integer layers, float allowed between"
        head = f"check for target {self.target} ({kind}), traced with {self.traced_with}: "
        head += (
            "OK, the model can be quantized for this target as it is"
            if self.ok
            else "NOT OK, change the model first"
        )
        lines = [head]
        if self.integer_ops:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.integer_ops.items()))
            lines.append(f"  runs in integer: {ops}")
        if not self.rows:
            lines.append("  no op outside the target's integer set")
        width = max((len(r.node) for r in self.rows), default=0)
        for r in self.rows:
            lines.append(f"  {r.node:<{width}}  {r.op:<12} {r.action:<10} {r.choice}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    __str__ = format


# Library classes of the same ops (transformers' GELUActivation, NewGELU, ...), by class name.
_NAME_HINTS = (
    ("gelu", "gelu"),
    ("hardswish", "hardswish"),
    ("silu", "silu"),
    ("swish", "silu"),
    ("mish", "mish"),
    ("layernorm", "layer_norm"),
    ("rmsnorm", "layer_norm"),
    ("softmax", "softmax"),
    ("sigmoid", "sigmoid"),
    ("tanh", "tanh"),
)


def _module_op(m: nn.Module) -> str:
    """The op a module computes: its entry in the tables, a hint from its class name, or the
    class name itself (unknown: refused on fully integer targets)."""
    if isinstance(m, nn.Upsample):
        return f"upsample ({m.mode})"
    named = _NAMED_MODULES.get(type(m))
    if named is not None:
        return named
    lowered = type(m).__name__.lower()
    for hint, op in _NAME_HINTS:
        if hint in lowered:
            return op
    return type(m).__name__


def op_row(node: str, op: str, fully_integer: bool, target: str, at_output: bool) -> OpRow:
    replacement, why = _NOT_INTEGER.get(op, (None, "no integer kernel known for this op"))
    if not fully_integer:
        return OpRow(
            node,
            op,
            KEEP_FLOAT,
            f"kept in float: {target}'s export runs it between DequantizeLinear and "
            "QuantizeLinear (an integer-only port would need it replaced)",
        )
    if at_output and op in _MONOTONIC_AT_OUTPUT:
        return OpRow(
            node,
            op,
            REMOVE,
            "it produces the model's output and is monotonic: drop it (top-1 is the argmax "
            "of the logits) and apply it on the host in float if probabilities are needed",
        )
    if replacement is not None:
        return OpRow(node, op, REPLACE, f"replace with {replacement}: {why}")
    return OpRow(node, op, REFUSE, f"{target} cannot run it: {why}")


def target_spec(target: str) -> Any:
    if not isinstance(target, str):
        hint = f" (this recipe's is {target.target!r})" if hasattr(target, "target") else ""
        raise TypeError(
            f"target must be a target name, one of {', '.join(TARGETS)}{hint}; "
            f"got {type(target).__name__}"
        )
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[target]


def _nearest_upsample(m: nn.Module) -> bool:
    return isinstance(m, nn.Upsample) and m.mode == "nearest"


def _classify_fx(
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
        if _nearest_upsample(m):
            return "upsample (nearest)", None
        for types, name in ((_INTEGER_MODULES, None),):
            kind = types.get(type(m))
            if kind is not None:
                return kind, name
        return None, _module_op(m)
    if node.op == "call_function":
        if node.target in _INTEGER_FUNCTIONS:
            return _INTEGER_FUNCTIONS[node.target], None
        if node.target in _NAMED_FUNCTIONS:
            return None, _NAMED_FUNCTIONS[node.target]
        if node.target is getattr:
            return None, None
        return None, getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        target = str(node.target)
        if target in _SHAPE_QUERIES:
            return None, None
        if target in _INTEGER_METHODS:
            return _INTEGER_METHODS[target], None
        if target in _NAMED_METHODS:
            return None, _NAMED_METHODS[target]
        return None, target
    return None, None


def _is_tensor_node(node: torch.fx.Node, memo: dict[torch.fx.Node, bool]) -> bool:
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
        and node.target in _SHAPE_QUERIES
        or node.op == "call_function"
        and node.target is getattr
    ):
        result = False
    elif node.op in ("call_function", "call_method"):
        inputs = [a for a in node.all_input_nodes]
        result = any(_is_tensor_node(a, memo) for a in inputs)
    else:
        result = False
    memo[node] = result
    return result


def _check_fx(model: nn.Module, example_inputs: Any, result: CheckResult) -> None:
    gm = torch.fx.symbolic_trace(model)
    if example_inputs is not None:
        from edgequant.batches import split_inputs

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
        if node.op != "call_module" and not _is_tensor_node(node, memo):
            continue
        kind, other = _classify_fx(node, modules)
        if kind is not None and kind.startswith("batchnorm"):
            source = node.args[0] if node.args else None
            if not (
                isinstance(source, torch.fx.Node)
                and source.op == "call_module"
                and isinstance(modules.get(str(source.target)), (nn.Conv1d, nn.Conv2d, nn.Linear))
                and len(source.users) == 1
            ):
                kind, other = None, "batch_norm"
        if kind is not None:
            result.integer_ops[kind] = result.integer_ops.get(kind, 0) + 1
            continue
        if other is None:
            continue
        at_output = any(u.op == "output" for u in node.users)
        label = str(node.target) if node.op == "call_module" else node.name
        result.rows.append(op_row(label, other, fully, result.target, at_output))


def _check_hooks(model: nn.Module, example_inputs: Any, result: CheckResult) -> None:
    from edgequant.batches import call_model, naming_the_batch

    seen: list[tuple[str, nn.Module]] = []
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: Any, out: Any) -> None:
            seen.append((name, mod))

        return fn

    # A module that computes with its children's parameters without calling them (attention
    # reads out_proj's weight) is one op: hook it, not what is inside.
    opaque = [
        n
        for n, m in model.named_modules()
        if n and list(m.children()) and (type(m) in _NAMED_MODULES or isinstance(m, _BLOCKS))
    ]
    for name, m in model.named_modules():
        if not name or any(name.startswith(f"{o}.") for o in opaque):
            continue
        if name in opaque or not list(m.children()):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad(), naming_the_batch(example_inputs, "example_inputs"):
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    last = seen[-1][0] if seen else None
    for name, m in dict(seen).items():
        kind = "upsample (nearest)" if _nearest_upsample(m) else _INTEGER_MODULES.get(type(m))
        if kind is not None:
            result.integer_ops[kind] = result.integer_ops.get(kind, 0) + 1
            continue
        other = _module_op(m)
        result.rows.append(op_row(name, other, result.fully_integer, result.target, name == last))


def check(model: nn.Module, target: str, example_inputs: Any = None) -> CheckResult:
    """Which ops of `model` `target` cannot run in integer, and the choice for each: keep in
    float (targets whose runtime allows float ops between quantized layers), a known
    replacement, remove (a monotonic op at the output) or refuse. No calibration needed.

    Traces with torch.fx; a model fx cannot trace is checked with forward hooks on its
    modules instead (needs example_inputs; functional ops are then invisible, and the result
    says so). Unknown target: ValueError listing the known ones.
    """
    spec = target_spec(target)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    result = CheckResult(target=spec.name, fully_integer=spec.fully_integer)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            _check_fx(model, example_inputs, result)
        except Exception as err:  # fx fails in many ways on dynamic Python
            if example_inputs is None:
                raise ValueError(
                    f"torch.fx cannot trace the model ({type(err).__name__}: {err}); pass "
                    "example_inputs so that check can follow the modules with hooks"
                ) from err
            result.rows.clear()
            result.integer_ops.clear()
            result.traced_with = "forward hooks"
            result.notes.append(
                f"torch.fx could not trace the model ({type(err).__name__}): only module calls "
                "were seen; functional ops (torch.*, F.*, operators) are not in this list"
            )
            _check_hooks(model, example_inputs, result)
    finally:
        for m, flag in flags.items():
            m.training = flag
    return result


def require_target_fits(
    model: nn.Module, target: str, method: str, example_inputs: Any = None
) -> None:
    """ValueError before any calibration when a fully integer target (mcu-int8) cannot take
    `model` quantized by `method`, naming the op and the layer; nothing for other targets.

    Only static quantization gives integer activations everywhere; the ops are those `check`
    refuses, must replace, or would remove at the output.
    """
    spec = target_spec(target)
    if not spec.fully_integer:
        return
    if method != "static":
        layers = [
            (n, type(m).__name__)
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
        ]
        where = f"layer {layers[0][0]!r} ({layers[0][1]}) and every other" if layers else "every"
        how = (
            "quantizes activations in float at run time (DynamicQuantizeLinear)"
            if method == "dynamic"
            else "keeps activations in float"
        )
        raise ValueError(
            f"method {method!r} {how}, and target {spec.name!r} needs a fully integer graph: "
            f"{where} layer would compute on float activations; use method='static'"
        )
    result = check(model, spec.name, example_inputs)
    bad = [r for r in result.rows if r.action != KEEP_FLOAT]
    if bad:
        listed = "; ".join(f"op {r.op!r} at {r.node!r} ({r.action}: {r.choice})" for r in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            f"target {spec.name!r} needs a fully integer graph, and this model has ops it "
            f"cannot run in integer: {listed}{more}. Nothing was calibrated; "
            "`edgequant check` lists every one"
        )
