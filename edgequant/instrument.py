"""Walk a model, fold BatchNorm, swap in quantized layers as the recipe says, and say what was
done, what was skipped and why."""

from __future__ import annotations

import contextlib
import copy
import math
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from edgequant.modules import QUANT_MODULES, QuantMixin, from_float
from edgequant.quantizer import TensorQuantizer
from edgequant.spec import TARGETS, QuantSpec, Recipe

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_NORMS_AND_SUCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class LayerRecord:
    name: str
    type: str
    quantized: bool
    weight: str = "float"
    activation: str = "float"
    reason: str = ""
    bn_folded: str = ""
    output: str = "float"


@dataclass
class Summary:
    """What instrumentation did to each layer."""

    recipe: str
    method: str
    layers: list[LayerRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The recipe's hardware target (spec.TARGETS): place_graph_quantizers reads its rules.
    target: str = "onnxruntime"

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.quantized]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.quantized]

    def format(self) -> str:
        lines = [
            f"{self.method} quantization with recipe {self.recipe!r}: "
            f"{len(self.quantized)} layers quantized, {len(self.skipped)} kept in float"
        ]
        width = max((len(r.name) for r in self.layers), default=10)
        for r in self.layers:
            if r.quantized:
                bn = f"  (+{r.bn_folded} folded)" if r.bn_folded else ""
                out = "  output quantized" if r.output != "float" else ""
                lines.append(
                    f"  {r.name:<{width}}  {r.type:<8} W {r.weight:<32} A {r.activation}{bn}{out}"
                )
            else:
                lines.append(f"  {r.name:<{width}}  {r.type:<8} float: {r.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    __str__ = format

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "method": self.method,
            "target": self.target,
            "layers": [r.__dict__ for r in self.layers],
            "notes": list(self.notes),
        }


def attach_info(model: nn.Module, summary: Summary, info: dict[str, Any]) -> None:
    """Set `model.quant_summary` and `model.quant_info`. They are plain attributes, which
    nn.Module.__setattr__ stores as any object does, but its annotation admits only tensors and
    modules: hence setattr."""
    attrs: dict[str, Any] = {"quant_summary": summary, "quant_info": info}
    for name, value in attrs.items():
        setattr(model, name, value)


def call_model(model: nn.Module, batch: Any, index: int = 0) -> Any:
    """Run the model on one calibration item: a tensor, a tuple of positional args, or a dict of
    keyword args (a Hugging Face tokenizer batch)."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        try:
            return model(*batch)
        except TypeError as err:
            if len(batch) == 2:
                raise TypeError(
                    f"calling the model on calibration item {index} failed ({err}); tuples are passed as "
                    "positional arguments: if your loader yields (inputs, labels), pass "
                    "(x for x, _ in loader)"
                ) from err
            raise
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return model(**dict(batch))
    raise TypeError(
        f"calibration items must be tensors, tuples of tensors or dicts of keyword arguments; got {type(batch).__name__}"
    )


def batch_size(batch: Any) -> int:
    """Number of samples in one calibration item (dim 0 of its first tensor)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    values: Iterable[Any] = batch.values() if hasattr(batch, "values") else batch
    for v in values:
        if isinstance(v, Tensor):
            return int(v.shape[0]) if v.dim() > 0 else 1
    raise TypeError(f"calibration item of type {type(batch).__name__} holds no tensor")


def describe_batch(batch: Any) -> str:
    """What one model input holds, for errors: 'a Tensor (4, 7) float32', 'a tuple of ...'; the
    device where it is not the CPU. Every error that names a batch (calibration, export,
    verification, compare) describes it with this."""

    def one(v: Any) -> str:
        if isinstance(v, Tensor):
            where = "" if v.device.type == "cpu" else f" on {v.device}"
            return f"Tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}{where}"
        return type(v).__name__

    if isinstance(batch, Tensor):
        return f"a {one(batch)}"
    if isinstance(batch, (tuple, list)):
        more = ", ..." if len(batch) > 4 else ""
        return f"a {type(batch).__name__} of {', '.join(one(v) for v in batch[:4])}{more}"
    if hasattr(batch, "items"):
        items = list(batch.items())
        more = ", ..." if len(items) > 4 else ""
        return "a mapping of " + ", ".join(f"{k}: {one(v)}" for k, v in items[:4]) + more
    return f"a {type(batch).__name__}"


def metric_number(value: Any, fn: str, what: str, finite: bool = True) -> float:
    """What a user's metric function (`fn`: "eval_fn", "val_fn") returned for `what`, as a float:
    an int, a float, a numpy scalar, a one-element tensor or array. Anything else is a TypeError
    naming the type (and shape); with finite=True a NaN or Inf is a ValueError, because it
    compares false with every tolerance and would quietly accept or reject everything."""
    number: float | None = None
    if getattr(value, "size", None) == 1 or (isinstance(value, Tensor) and value.numel() == 1):
        value = value.item()  # one-element numpy arrays and tensors, whatever their shape
    if not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            number = None
    if number is None:
        shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(
            f"{fn} must return a number (a float), but for {what} it returned {type(value).__name__}{shape} "
            f"{shown}"
        )
    if finite and not math.isfinite(number):
        raise ValueError(
            f"{fn} returned {number} for {what}: it must return a finite number, so that it can "
            "be compared with the FP32 model's and the tolerance"
        )
    return number


def nonfinite(t: Any, nan_only: bool = False) -> int:
    """How many values of `t` are NaN (or, unless nan_only, +-Inf); 0 for anything that is not a
    float tensor with data. The one test behind every "holds NaN" refusal: calibration items
    (check_finite), QAT's training batches, export's example and verification inputs."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.is_meta:
        return 0
    bad = torch.isnan(t) if nan_only else ~torch.isfinite(t)
    return int(bad.sum())


def check_finite(batch: Any, index: int) -> None:
    tensors: Iterable[Any]
    if isinstance(batch, Tensor):
        tensors = [batch]
    else:
        tensors = batch.values() if hasattr(batch, "values") else batch
    for t in tensors:
        if count := nonfinite(t):
            raise ValueError(
                f"calibration item {index} holds NaN or Inf in the model's input ({count} of "
                f"{t.numel()} values)"
            )


@dataclass
class _Trace:
    order: list[str]
    bn_of: dict[str, str]


def trace_layers(model: nn.Module, batch: Any) -> _Trace:
    """Run one batch with hooks: the order in which quantizable layers run, and which BatchNorm
    reads a conv/linear output directly (the pairs that can be folded). batch None (methods
    that need no data: dynamic, weight-only): no run, every quantizable layer in the order the
    model registers it, and no BatchNorm to fold."""
    if batch is None:
        return _Trace([n for n, m in model.named_modules() if type(m) in QUANT_MODULES], {})
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    produced: dict[int, str] = {}
    bn_of: dict[str, str] = {}
    hooks = []

    runs: dict[str, int] = {}

    def layer_hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        name = names[mod]
        runs[name] = runs.get(name, 0) + 1
        if name not in order:
            order.append(name)
        if isinstance(out, Tensor):
            produced[id(out)] = name

    def bn_hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        src = produced.get(id(inputs[0])) if inputs else None
        if src is not None:
            bn_of.setdefault(src, names[mod])

    for m in model.modules():
        if type(m) in QUANT_MODULES:
            hooks.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, _BATCHNORMS):
            hooks.append(m.register_forward_hook(bn_hook))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    # A BN that two layers feed, or that runs on a layer's output more than once, is not folded.
    counts: dict[str, int] = {}
    for bn in bn_of.values():
        counts[bn] = counts.get(bn, 0) + 1
    return _Trace(order, {k: v for k, v in bn_of.items() if counts[v] == 1 and runs.get(k, 0) == 1})


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """PyTorch's fused attention fast path off for the duration, restored after (even on error)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class SlowPathMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention that always takes PyTorch's reference path: the same function,
    never the fused kernel (torch._native_multi_head_attention), which no exporter translates."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _mha_fastpath_disabled():
            return super().forward(*args, **kwargs)


class SlowPathTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer that always takes PyTorch's reference path, which calls its
    submodules (linear1, linear2, the norms); in eval mode its fused fast path reads their
    weights directly, so a quantized linear1 would never see data."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _mha_fastpath_disabled():
            return super().forward(*args, **kwargs)


class SlowPathTransformerEncoder(nn.TransformerEncoder):
    """nn.TransformerEncoder without its fast path (nested tensors from the padding mask)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _mha_fastpath_disabled():
            return super().forward(*args, **kwargs)


_SLOW_PATHS: dict[type[nn.Module], type[nn.Module]] = {
    nn.MultiheadAttention: SlowPathMultiheadAttention,
    nn.TransformerEncoderLayer: SlowPathTransformerEncoderLayer,
    nn.TransformerEncoder: SlowPathTransformerEncoder,
}


def take_slow_paths(model: nn.Module) -> list[str]:
    """Switch (in place) every PyTorch module with a fused eval-mode fast path to the class that
    always takes the reference path; return notes for the summary.

    Same parameters, buffers and state-dict keys; only the fast path is gone. Attention itself
    stays float: F.multi_head_attention_forward reads in_proj_weight (a raw parameter) and
    out_proj's weight and bias directly, never calling out_proj as a module.
    """
    notes = []
    for name, module in model.named_modules():
        slow = _SLOW_PATHS.get(type(module))
        if slow is None:
            continue
        module.__class__ = slow
        if isinstance(module, nn.MultiheadAttention):
            notes.append(
                f"{name} (MultiheadAttention): attention kept in float: its fused fast path is "
                "off, and PyTorch's attention reads in_proj_weight and out_proj's weight as "
                "parameters, never calling a layer edgequant could quantize"
            )
        elif isinstance(module, nn.TransformerEncoderLayer):
            notes.append(
                f"{name} (TransformerEncoderLayer): fused fast path off, so linear1 and linear2 "
                "run as layers and are quantized"
            )
    return notes


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _with_bits(spec: QuantSpec | None, bits: int | None) -> QuantSpec | None:
    if spec is None or bits is None or spec.bits >= bits:
        return spec
    if spec.granularity == "group":
        # Per output channel (axis 0: a Linear's rows, an embedding's rows), not along the
        # group's axis (a group spec runs along the input dim, axis 1).
        return spec.replace(bits=bits, group_size=None, granularity="channel", axis=0)
    return spec.replace(bits=bits)


def instrument(
    model: nn.Module,
    recipe: Recipe,
    example_batch: Any,
    method: str,
    fold_bn: bool = True,
    layer_types: tuple[type[nn.Module], ...] | None = None,
) -> tuple[nn.Module, Summary]:
    """A quantized copy of `model`; the original is not modified.

    `layer_types` limits which float types are quantized (dynamic quantization takes Linear only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(
            f"recipe must be an edgequant.Recipe (or a preset name), got {type(recipe).__name__}"
        )
    qmodel = copy.deepcopy(model).eval()
    slow_path_notes = take_slow_paths(qmodel)
    trace = trace_layers(qmodel, example_batch)
    summary = Summary(recipe=recipe.name, method=method, target=recipe.target)
    summary.notes.extend(slow_path_notes)
    supported = layer_types or tuple(QUANT_MODULES)
    executed = [n for n in trace.order if isinstance(qmodel.get_submodule(n), supported)]
    first_last = {executed[0], executed[-1]} if executed else set()
    # Tied weights (a language model's embedding and lm_head share one Parameter): the first
    # quantized layer that holds it, by the Parameter's identity in the copy.
    tied: dict[int, tuple[str, QuantSpec | None, Tensor]] = {}

    for name, module in list(qmodel.named_modules()):
        if not name or isinstance(module, QuantMixin):
            continue
        mtype = type(module).__name__
        if type(module) not in supported:
            if type(module) in QUANT_MODULES:
                summary.layers.append(
                    LayerRecord(
                        name,
                        mtype,
                        False,
                        reason=f"{method} quantization covers "
                        + ", ".join(t.__name__ for t in supported)
                        + " only",
                    )
                )
            elif isinstance(module, tuple(QUANT_MODULES)):
                summary.layers.append(
                    LayerRecord(
                        name,
                        mtype,
                        False,
                        reason=f"subclass of {module.__class__.__mro__[1].__name__} with its own forward: not swapped",
                    )
                )
            elif any(True for _ in module.parameters(recurse=False)) and not isinstance(
                module, _NORMS_AND_SUCH
            ):
                summary.layers.append(
                    LayerRecord(
                        name, mtype, False, reason="no quantized version of this layer type"
                    )
                )
            continue
        if name not in trace.order:
            summary.layers.append(
                LayerRecord(name, mtype, False, reason="never ran on the calibration batch")
            )
            continue
        weight_spec, act_spec, reason = recipe.specs_for(name, mtype)
        if reason is not None:
            summary.layers.append(LayerRecord(name, mtype, False, reason=reason))
            continue
        if isinstance(module, nn.Embedding):
            act_spec = None  # its inputs are indices
        if name in first_last and recipe.first_last_bits is not None:
            weight_spec = _with_bits(weight_spec, recipe.first_last_bits)
            act_spec = _with_bits(act_spec, recipe.first_last_bits)
        if weight_spec is not None and weight_spec.granularity == "group":
            size = module.weight.shape[weight_spec.axis]
            if size % weight_spec.group_size:
                raise ValueError(
                    f"layer {name!r}: weight dim {weight_spec.axis} has {size} elements, "
                    f"not divisible by group_size {weight_spec.group_size}"
                )
        bn_name = trace.bn_of.get(name) if fold_bn else None
        bn = qmodel.get_submodule(bn_name) if bn_name else None
        if bn is not None and (bn.training or not getattr(bn, "track_running_stats", False)):
            bn, bn_name = None, None
        weight_id = id(module.weight)
        new_layer = from_float(module, weight_spec, act_spec, name, bn=bn)
        if bn is None and weight_id in tied:
            owner, owner_spec, _ = tied[weight_id]
            if owner_spec == weight_spec:
                # One Parameter on one grid: the export stores one table for both.
                new_layer.weight = qmodel.get_submodule(owner).weight
                summary.notes.append(
                    f"{name} shares its weight with {owner} (tied): kept tied, one quantized table"
                )
            else:
                summary.notes.append(
                    f"{name} shares its weight with {owner} (tied), but the recipe gives them "
                    f"different grids ({weight_spec.short() if weight_spec else 'float'} vs "
                    f"{owner_spec.short() if owner_spec else 'float'}): quantized as two tables"
                )
        elif bn is None:
            tied[weight_id] = (name, weight_spec, module.weight)  # kept alive: ids stay unique
        _set_submodule(qmodel, name, new_layer)
        if bn_name:
            _set_submodule(qmodel, bn_name, nn.Identity())
        summary.layers.append(
            LayerRecord(
                name,
                mtype,
                True,
                weight=weight_spec.short() if weight_spec else "float",
                activation=act_spec.short() if act_spec else "float",
                bn_folded=bn_name or "",
            )
        )
    folded = [r for r in summary.layers if r.bn_folded]
    if folded and fold_bn and not _same_outputs(model, qmodel, example_batch):
        # The hooks cannot see functional readers of a conv's output (`bn(y) + y`): folding
        # changed what the model computes, so instrument again without folding.
        qmodel, summary = instrument(
            model, recipe, example_batch, method, fold_bn=False, layer_types=layer_types
        )
        summary.notes.append(
            "BatchNorm not folded: folding changed the float model's output (a conv's output "
            "has readers besides its BatchNorm)"
        )
        return qmodel, summary
    if not summary.quantized:
        kinds = ", ".join(t.__name__ for t in supported)
        why = "; ".join(f"{r.name}: {r.reason}" for r in summary.skipped[:5])
        raise ValueError(
            f"the model has no quantizable layer ({kinds}) that ran on the calibration data"
            + (f" ({why})" if why else "")
        )
    return qmodel, summary


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


def _same_outputs(
    model: nn.Module, qmodel: nn.Module, batch: Any, min_sqnr_db: float = 60.0
) -> bool:
    """Does the instrumented model (quantizers not yet active) compute what the float model does?"""
    from edgequant.functional import sqnr_db

    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ref, _ = torch.utils._pytree.tree_flatten(call_model(model, batch))
            out, _ = torch.utils._pytree.tree_flatten(call_model(qmodel, batch))
    finally:
        for m, flag in flags.items():
            m.training = flag
    pairs = [
        (r, o)
        for r, o in zip(ref, out, strict=False)
        if isinstance(r, Tensor) and r.is_floating_point()
    ]
    return len(ref) == len(out) and all(
        r.shape == o.shape and sqnr_db(r, o) >= min_sqnr_db for r, o in pairs
    )


def quant_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            yield name, m
