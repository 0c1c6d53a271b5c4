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
    """Rewrite every concatenation of one tensor with tensors of zeros as F.pad of that tensor
    (the same values); returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in CONCAT_FUNCTIONS):
            continue
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            continue
        kept = [i for i, t in enumerate(tensors) if not is_zeros(t)]
        if len(kept) != 1 or len(tensors) < 2 or not isinstance(tensors[kept[0]], torch.fx.Node):
            continue
        k = kept[0]
        with gm.graph.inserting_before(node):
            pads = gm.graph.call_function(
                zero_pads, (tensors[k], tuple(tensors[:k]), tuple(tensors[k + 1 :]), dim)
            )
            pad = gm.graph.call_function(F.pad, (tensors[k], pads))
        node.replace_all_uses_with(pad)
        gm.graph.erase_node(node)
        count += 1
    return count
