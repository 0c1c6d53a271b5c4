"""A concatenation with tensors of zeros is a zero padding: `torch.cat([s, torch.zeros_like(s)],
1)`, an option-A shortcut written without F.pad, becomes `F.pad(s, ...)` in the traced graph, so
that it is quantized, exported and run as the padding it is (the zero point on every grid)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from edgequant.check.ops import ZERO_CONSTANT_FUNCTIONS, ZERO_CONSTANT_METHODS
from edgequant.graph_quantizers.ops import CONCAT_FUNCTIONS


def is_zeros(node: object) -> bool:
    """Whether an fx node makes a tensor of zeros from a shape (zeros_like, zeros, new_zeros)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in ZERO_CONSTANT_FUNCTIONS
    return node.op == "call_method" and node.target in ZERO_CONSTANT_METHODS


def zero_pads(
    x: torch.Tensor, before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], dim: int
) -> list[int]:
    """F.pad's pad list that puts the zeros of `before` and `after` around x along dim."""
    dim = dim % x.dim()
    low = sum(int(z.shape[dim]) for z in before)
    high = sum(int(z.shape[dim]) for z in after)
    return [0, 0] * (x.dim() - 1 - dim) + [low, high]


def cats_with_zeros_as_pads(gm: torch.fx.GraphModule) -> int:
    """Rewrite every concatenation with tensors of zeros as F.pad of the tensors beside them
    (the same values): cat([s, zeros]) becomes F.pad(s), cat([a, zeros, b]) becomes
    cat([F.pad(a), b]) (each run of zeros padding the tensor before it, a leading run the first
    tensor). Returns how many concatenations were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in CONCAT_FUNCTIONS):
            continue
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            continue
        kept = [i for i, t in enumerate(tensors) if not is_zeros(t)]
        if not kept or len(kept) == len(tensors):
            continue
        if not all(isinstance(tensors[k], torch.fx.Node) for k in kept):
            continue
        # Tensor k takes the zeros up to the next kept tensor; the first also those before it.
        bounds = [0, *kept[1:], len(tensors)]
        parts = []
        with gm.graph.inserting_before(node):
            for j, k in enumerate(kept):
                before, after = tuple(tensors[bounds[j] : k]), tuple(tensors[k + 1 : bounds[j + 1]])
                if not before and not after:
                    parts.append(tensors[k])
                    continue
                pads = gm.graph.call_function(zero_pads, (tensors[k], before, after, dim))
                parts.append(gm.graph.call_function(F.pad, (tensors[k], pads)))
            joined = (
                parts[0] if len(parts) == 1 else gm.graph.call_function(torch.cat, (parts, dim))
            )
        node.replace_all_uses_with(joined)
        gm.graph.erase_node(node)
        count += 1
    return count
