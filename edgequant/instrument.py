"""Walk a model, fold BatchNorm, swap in quantized layers as the recipe says, and say what was
done, what was skipped and why."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from edgequant.batches import (
    batch_size,
    call_model,
    check_finite,
    describe_batch,
    in_eval_mode,
    metric_number,
    nonfinite,
    removing_hooks,
)
from edgequant.functional import sqnr_db
from edgequant.graph_quantizers import place_graph_quantizers
from edgequant.modules import QUANT_MODULES, QuantMixin, from_float
from edgequant.recipe import Recipe
from edgequant.slow_paths import take_slow_paths
from edgequant.spec import QuantSpec
from edgequant.summary import LayerRecord, Summary, attach_info

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

_NORMS_AND_SUCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
    with removing_hooks(hooks), torch.no_grad():
        call_model(model, batch)
    # A BN that two layers feed, or that runs on a layer's output more than once, is not folded.
    counts: dict[str, int] = {}
    for bn in bn_of.values():
        counts[bn] = counts.get(bn, 0) + 1
    return _Trace(order, {k: v for k, v in bn_of.items() if counts[v] == 1 and runs.get(k, 0) == 1})


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
            unswapped = _why_not_swapped(module, supported, method)
            if unswapped is not None:
                summary.layers.append(LayerRecord(name, mtype, False, reason=unswapped))
            continue
        if name not in trace.order:
            summary.layers.append(
                LayerRecord(name, mtype, False, reason="never ran on the calibration batch")
            )
            continue
        weight_spec, act_spec, reason = _layer_specs(recipe, name, module, name in first_last)
        if reason is not None:
            summary.layers.append(LayerRecord(name, mtype, False, reason=reason))
            continue
        bn_name = trace.bn_of.get(name) if fold_bn else None
        bn_name = _swap(qmodel, summary, tied, name, module, weight_spec, act_spec, bn_name)
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


def _swap(
    qmodel: nn.Module,
    summary: Summary,
    tied: dict[int, tuple[str, QuantSpec | None, Tensor]],
    name: str,
    module: nn.Module,
    weight_spec: QuantSpec | None,
    act_spec: QuantSpec | None,
    bn_name: str | None,
) -> str | None:
    """Replace layer `name` by its quantized version, folding the BatchNorm `bn_name` (in eval
    mode with running statistics; it becomes an Identity). Returns the BatchNorm folded."""
    bn = qmodel.get_submodule(bn_name) if bn_name else None
    if bn is not None and (bn.training or not getattr(bn, "track_running_stats", False)):
        bn, bn_name = None, None
    weight = module.weight
    new_layer = from_float(module, weight_spec, act_spec, name, bn=bn)
    if bn is None:
        _keep_tied(qmodel, summary, tied, name, cast(Tensor, weight), weight_spec, new_layer)
    _set_submodule(qmodel, name, new_layer)
    if bn_name:
        _set_submodule(qmodel, bn_name, nn.Identity())
    return bn_name


def _why_not_swapped(
    module: nn.Module, supported: tuple[type[nn.Module], ...], method: str
) -> str | None:
    """Why a module of a type this method does not swap stays float, where the summary should
    say so (a layer type with parameters); None for containers and norms."""
    if type(module) in QUANT_MODULES:
        return f"{method} quantization covers " + ", ".join(t.__name__ for t in supported) + " only"
    if isinstance(module, tuple(QUANT_MODULES)):
        return (
            f"subclass of {module.__class__.__mro__[1].__name__} with its own forward: not swapped"
        )
    if any(True for _ in module.parameters(recurse=False)) and not isinstance(
        module, _NORMS_AND_SUCH
    ):
        return "no quantized version of this layer type"
    return None


def _layer_specs(
    recipe: Recipe, name: str, module: nn.Module, first_or_last: bool
) -> tuple[QuantSpec | None, QuantSpec | None, str | None]:
    """(weight spec, activation spec, skip reason) of one layer: the recipe's, none for an
    embedding's index inputs, first_last_bits at the ends; a group size must divide the dim."""
    weight_spec, act_spec, reason = recipe.specs_for(name, type(module).__name__)
    if reason is not None:
        return None, None, reason
    if isinstance(module, nn.Embedding):
        act_spec = None  # its inputs are indices
    if first_or_last and recipe.first_last_bits is not None:
        weight_spec = _with_bits(weight_spec, recipe.first_last_bits)
        act_spec = _with_bits(act_spec, recipe.first_last_bits)
    if weight_spec is not None and weight_spec.granularity == "group":
        size = cast(Tensor, module.weight).shape[weight_spec.axis]
        if size % cast(int, weight_spec.group_size):
            raise ValueError(
                f"layer {name!r}: weight dim {weight_spec.axis} has {size} elements, "
                f"not divisible by group_size {weight_spec.group_size}"
            )
    return weight_spec, act_spec, None


def _keep_tied(
    qmodel: nn.Module,
    summary: Summary,
    tied: dict[int, tuple[str, QuantSpec | None, Tensor]],
    name: str,
    weight: Tensor,
    weight_spec: QuantSpec | None,
    new_layer: nn.Module,
) -> None:
    """A weight Parameter already quantized by another layer (tied) stays one Parameter when
    both layers put it on the same grid; the first holder of each Parameter is recorded."""
    if id(weight) not in tied:
        tied[id(weight)] = (name, weight_spec, weight)  # kept alive: ids stay unique
        return
    owner, owner_spec, _ = tied[id(weight)]
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


def _same_outputs(
    model: nn.Module, qmodel: nn.Module, batch: Any, min_sqnr_db: float = 60.0
) -> bool:
    """Does the instrumented model (quantizers not yet active) compute what the float model does?"""
    with in_eval_mode(model), torch.no_grad():
        ref, _ = torch.utils._pytree.tree_flatten(call_model(model, batch))
        out, _ = torch.utils._pytree.tree_flatten(call_model(qmodel, batch))
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


# Re-exported for the modules above that read them from here.
__all__ = [
    "LayerRecord",
    "Summary",
    "attach_info",
    "batch_size",
    "call_model",
    "check_finite",
    "describe_batch",
    "instrument",
    "metric_number",
    "nonfinite",
    "place_graph_quantizers",
    "quant_layers",
    "take_slow_paths",
    "trace_layers",
]
