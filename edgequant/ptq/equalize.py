"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For two layers in a chain, y = W2 relu(W1 x + b1), scaling output channel i of the first layer by
1/s_i and input channel i of the second by s_i leaves y unchanged (ReLU is positive homogeneous).
Choosing s_i = sqrt(r1_i / r2_i) (r: the channel's largest absolute weight) gives both channels
the same range, which helps weight grids whose channels differ wildly (per-tensor grids, depthwise
convolutions). Pairs are found on the torch.fx graph of the instrumented model: the first layer's
output must reach the second and nothing else, through ReLUs and (not yet calibrated) quantizers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgequant.modules import QuantMixin
from edgequant.quantizer import TensorQuantizer

_PASS_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, TensorQuantizer)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu}


def _equalizable(m: nn.Module | None) -> bool:
    return (
        isinstance(m, QuantMixin)
        and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
        and getattr(m, "groups", 1) == 1
    )


def find_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(first, second) layer names that can be equalized; empty when the model is not a
    torch.fx GraphModule (the pairs cannot be proven then)."""
    if not isinstance(model, torch.fx.GraphModule):
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in model.graph.nodes:
        if node.op != "call_module" or not _equalizable(modules.get(str(node.target))):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            mod = modules.get(str(nxt.target)) if nxt.op == "call_module" else None
            if _equalizable(mod):
                if len(nxt.args) >= 1 and nxt.args[0] is cur:
                    pairs.append((str(node.target), str(nxt.target)))
                break
            passes = isinstance(mod, _PASS_MODULES) or (
                nxt.op == "call_function" and nxt.target in _PASS_FUNCTIONS
            )
            if not passes:
                break
            cur = nxt
    return pairs


def _out_range(w: Tensor) -> Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)


def _in_range(w: Tensor) -> Tensor:
    return w.detach().abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


def equalize_pair(first: QuantMixin, second: QuantMixin) -> float:
    """Equalize one pair in place; returns the largest |log2 s| (how much was moved)."""
    w1, w2 = first.weight, second.weight
    if w1.shape[0] != w2.shape[1]:
        return 0.0
    r1, r2 = _out_range(w1).double(), _in_range(w2).double()
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
    with torch.no_grad():
        shape1 = (-1,) + (1,) * (w1.dim() - 1)
        w1.div_(s.reshape(shape1).to(w1.dtype))
        if first.bias is not None:
            first.bias.div_(s.to(first.bias.dtype))
        shape2 = (1, -1) + (1,) * (w2.dim() - 2)
        w2.mul_(s.reshape(shape2).to(w2.dtype))
    return float(torch.log2(s).abs().max())


def equalize(model: nn.Module, iterations: int = 4) -> list[tuple[str, str]]:
    """Cross-layer equalization of every pair find_pairs finds (a few sweeps, so chains of
    more than two layers settle); returns the pairs."""
    pairs = find_pairs(model)
    for _ in range(iterations):
        moved = 0.0
        for a, b in pairs:
            moved = max(
                moved,
                equalize_pair(model.get_submodule(a), model.get_submodule(b)),  # type: ignore[arg-type]
            )
        if moved < 1e-3:
            break
    return pairs
