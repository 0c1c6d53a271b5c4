"""Block reconstruction (BRECQ, Li et al. 2021): learned rounding of a whole block at once.

Layer-wise AdaRound reconstructs each layer's output on its own; the error the next layer's input
quantizer, a residual join or a nonlinearity adds is not in its loss. Here the layers of one block
(consecutive layers under the same parent module: a residual block, say) learn their up/down
rounding together, against the float model's value where the block ends (the input of the next
block's first layer, or the model's output), with every activation quantizer inside the block in
the loop (straight-through gradients).

The model must be a torch.fx GraphModule (what static quantization returns for a traceable model):
each block runs as a segment of the graph cut out of the whole, fed with the values that cross into
it, cached once for all calibration inputs; an iteration costs the block's forward and backward,
not the model's. Weights keep the grid their quantizer was calibrated with, as in rounding.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from edgequant.batches import batch_size, call_model
from edgequant.modules import QuantMixin
from edgequant.ptq.adaround import rectified_sigmoid, rounding_penalty, soft_rounding
from edgequant.ptq.rounding import layer_input, on_grid, supports, weight_grid
from edgequant.quantizer import TensorQuantizer

Group = list[tuple[str, QuantMixin]]


class SegmentError(ValueError):
    """A block that cannot be cut out of the graph as one segment (static.refine_weights then
    rounds its layers one by one with AdaRound, and says so in the summary)."""


def layer_groups(layers: Sequence[tuple[str, QuantMixin]]) -> list[Group]:
    """Consecutive layers (execution order) that share a parent module other than the root; a
    top-level layer is a block of its own."""
    groups: list[Group] = []
    parent_of_last = None
    for name, layer in layers:
        parent = name.rpartition(".")[0]
        if groups and parent and parent == parent_of_last:
            groups[-1].append((name, layer))
        else:
            groups.append([(name, layer)])
        parent_of_last = parent
    return groups


def _module_node(graph: fx.Graph, target: str) -> fx.Node:
    for node in graph.nodes:
        if node.op == "call_module" and node.target == target:
            return node
    raise KeyError(target)


class Segment:
    """The nodes of `gm` from the call of layer `start` to the value `stop` (inclusive), as a
    module whose inputs are the values computed before `start` that the segment reads (the
    frontier); and the prefix that computes the frontier from the model's inputs."""

    def __init__(self, gm: fx.GraphModule, start: str, stop: str | None) -> None:
        nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        first = pos[_module_node(gm.graph, start)]
        if stop is None:
            end = next(n for n in nodes if n.op == "output").args[0]
            if not isinstance(end, fx.Node):
                raise SegmentError("the model's output is not a single tensor")
        else:
            end = _module_node(gm.graph, stop).args[0]  # the stop layer's input
            if not isinstance(end, fx.Node):
                raise SegmentError(f"layer {stop!r} reads no graph value")
        end_node: fx.Node = end
        last = pos[end_node]
        if last < first:
            raise SegmentError(f"the block starting at {start!r} ends before it starts")
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.frontier: list[fx.Node] = []
        for node in nodes[first : last + 1]:
            for inp in node.all_input_nodes:
                if pos[inp] < first and inp not in env:
                    env[inp] = graph.placeholder(f"in_{inp.name}")
                    self.frontier.append(inp)
            env[node] = graph.node_copy(node, lambda a: env[a])
        graph.output(env[end_node])
        self.module = fx.GraphModule(gm, graph)
        prefix = fx.Graph()
        penv: dict[fx.Node, fx.Node] = {}
        for node in nodes[:first]:
            penv[node] = prefix.node_copy(node, lambda a: penv[a])
        prefix.output(tuple(penv[n] for n in self.frontier))
        self.prefix = fx.GraphModule(gm, prefix)

    def inputs(self, batches: list[Any]) -> list[Any]:
        """The frontier values for all calibration inputs: tensors with a batch dimension
        concatenated along it, anything else (the same for every batch) kept once."""
        runs = []
        with torch.no_grad():
            for index, batch in enumerate(batches):
                runs.append((batch_size(batch), call_model(self.prefix, batch, index)))
        merged: list[Any] = []
        for k, node in enumerate(self.frontier):
            values = [r[1][k] for r in runs]
            if all(
                isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n
                for (n, _), v in zip(runs, values, strict=True)
            ):
                merged.append(torch.cat(values))
            elif all(_same(values[0], v) for v in values[1:]):
                merged.append(_Const(values[0]))
            else:
                raise SegmentError(
                    f"graph value {node.name!r} varies between calibration batches but has no "
                    "batch dimension"
                )
        return merged


class _Const:
    def __init__(self, value: Any) -> None:
        self.value = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return bool(a == b)


def _take(values: list[Any], idx: Tensor) -> list[Any]:
    return [v.value if isinstance(v, _Const) else v[idx] for v in values]


def _channel_error(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dim 1), averaged over samples and positions."""
    diff = (out - target).square()
    return diff.sum(dim=1).mean() if diff.dim() > 1 else diff.mean()


def reconstruct_group(
    qmodel: fx.GraphModule,
    reference: fx.GraphModule,
    group: Group,
    stop: str | None,
    batches: list[Any],
    iters: int = 1000,
    batch_rows: int = 32,
    lr: float = 1e-2,
    reg: float = 0.01,
    seed: int = 0,
) -> None:
    """Learn the rounding of every weight in `group` together (see the module's docstring) and
    write the rounded weights back on their grids."""
    names = [n for n, _ in group]
    seg_q = Segment(qmodel, names[0], stop)
    seg_f = Segment(reference, names[0], stop)
    x_q = seg_q.inputs(batches)
    x_f = seg_f.inputs(batches)
    stop_q = qmodel.get_submodule(stop) if stop is not None else None
    stop_f = reference.get_submodule(stop) if stop is not None else None

    def finish(layer: nn.Module | None, y: Tensor) -> Tensor:
        return layer_input(layer, y) if isinstance(layer, QuantMixin) else y

    if not any(isinstance(v, Tensor) for v in x_q):
        raise SegmentError(f"the block of {names[0]!r} reads no batch of values computed before it")
    with torch.no_grad():
        all_rows = torch.arange(next(v for v in x_f if isinstance(v, Tensor)).shape[0])
        target = finish(stop_f, seg_f.module(*_take(x_f, all_rows)))
    n = target.shape[0]
    state = []
    for name, layer in group:
        scale, zp, qmin, qmax = weight_grid(layer)
        floor, v = soft_rounding(layer.weight.detach(), scale)
        state.append((name, layer, scale, zp, qmin, qmax, floor, v))
    wqs: list[TensorQuantizer] = [layer.weight_quantizer for _, layer, *_ in state]  # type: ignore[misc]
    modes = [q.mode for q in wqs]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([s[-1] for s in state], lr=lr)

    def weights(hard: bool) -> dict[str, Tensor]:
        out = {}
        for name, _, scale, zp, qmin, qmax, floor, v in state:
            h = (v >= 0).float() if hard else rectified_sigmoid(v)
            out[f"{name}.weight"] = on_grid(floor + h, zp, scale, qmin, qmax)
        return out

    try:
        for q in wqs:
            q.mode = "disabled"  # the soft weights are the quantized weights being learned
        for it in range(iters):
            idx = torch.randint(0, n, (min(batch_rows, n),), generator=gen)
            y = torch.func.functional_call(seg_q.module, weights(False), tuple(_take(x_q, idx)))
            rec = _channel_error(finish(stop_q, y), target[idx])
            penalty = rounding_penalty([s[-1] for s in state], it, iters, reg)
            loss = rec if penalty is None else rec + penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            for (_name, layer, *_), w in zip(state, weights(True).values(), strict=True):
                layer.weight.copy_(w)
    finally:
        for q, mode in zip(wqs, modes, strict=True):
            q.mode = mode


def block_plan(
    qmodel: nn.Module, layers: Sequence[tuple[str, QuantMixin]]
) -> tuple[list[tuple[Group, str | None]], dict[str, str]]:
    """The blocks to reconstruct, each with the layer whose input ends it (None: the model's
    output), and the layers left out with the reason."""
    skipped = {}
    if not isinstance(qmodel, fx.GraphModule):
        return [], {n: "the model is not a torch.fx graph" for n, _ in layers}
    kept = []
    for name, layer in layers:
        why = supports(layer)
        if why is None:
            kept.append((name, layer))
        else:
            skipped[name] = why
    groups = layer_groups(kept)
    plan: list[tuple[Group, str | None]] = []
    for k, group in enumerate(groups):
        stop = groups[k + 1][0][0] if k + 1 < len(groups) else None
        plan.append((group, stop))
    return plan, skipped
