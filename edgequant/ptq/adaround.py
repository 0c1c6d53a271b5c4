"""AdaRound: Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization",
ICML 2020.

AdaRound learns, for every weight, whether to round up or down: a soft rounding variable
h(V) in [0, 1] (a rectified sigmoid) is trained to minimise the layer's output error plus a
regulariser that pushes h to 0 or 1, then it is frozen to the nearest of the two.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from edgequant.modules import QuantMixin
from edgequant.ptq.rounding import (
    as_columns,
    layer_input,
    on_grid,
    weight_grid,
)

# --- AdaRound ---------------------------------------------------------------------------------
_ZETA, _GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def soft_rounding(w: Tensor, scale: Tensor) -> tuple[Tensor, nn.Parameter]:
    """floor(w / scale) and the rounding variable V, with h(V) at the fractional part: the soft
    weight floor + h(V) starts at the float weight."""
    w_floor = torch.floor(w / scale)
    rest = w / scale - w_floor
    v = nn.Parameter(
        -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA).clamp_min(1e-6) - 1).clamp(-8, 8)
    )
    return w_floor, v


def rounding_penalty(vs: list[nn.Parameter], it: int, iters: int, reg: float) -> Tensor | None:
    """AdaRound's regulariser, pushing h(V) to 0 or 1, with beta annealed from 20 to 2 after a
    20 % warm-up (None during the warm-up), as in the paper."""
    frac = it / max(iters - 1, 1)
    if frac < 0.2:
        return None
    beta = 2 + (20 - 2) * 0.5 * (1 + math.cos(math.pi * (frac - 0.2) / 0.8))
    total = sum(reg * (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum() for v in vs)
    return cast(Tensor, total)


def round_adaround(
    layer: QuantMixin,
    inputs: list[Tensor],
    targets: list[Tensor] | None = None,
    iters: int = 500,
    batch_rows: int = 2048,
    max_rows: int = 65536,
    lr: float = 1e-2,
    reg: float = 0.01,
    seed: int = 0,
) -> None:
    """AdaRound on one layer: learn up/down rounding to reconstruct the layer's output.

    The target is the float layer's output on the same (quantized) inputs, or `targets` (the
    float model's inputs to this layer, for the asymmetric reconstruction of the paper) when given.
    Works on the im2col form, so every layer type `as_columns` knows is a matrix product.
    """
    scale, zp, qmin, qmax = weight_grid(layer)
    shape = layer.weight.shape
    w = layer.weight.detach().reshape(shape[0], -1).float()
    s = scale.reshape(shape[0], -1).float()
    z = zp.reshape(shape[0], -1).float()
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, max_rows // len(inputs))
    parts_q, parts_f = [], []
    with torch.no_grad():
        # A bounded random sample of im2col rows from every batch keeps memory and time fixed.
        for i, x in enumerate(inputs):
            cq = as_columns(layer, layer_input(layer, x))
            idx = torch.randperm(cq.shape[0], generator=gen)[:per_batch]
            parts_q.append(cq[idx])
            if targets is not None:
                parts_f.append(as_columns(layer, layer.transform_input(targets[i]))[idx])
            else:
                parts_f.append(cq[idx])
    xq, xf = torch.cat(parts_q), torch.cat(parts_f)
    w_floor, v_param = soft_rounding(w, s)
    opt = torch.optim.Adam([v_param], lr=lr)
    target_all = xf @ w.T
    n = xq.shape[0]
    for it in range(iters):
        idx = torch.randint(0, n, (min(batch_rows, n),), generator=gen)
        wq = on_grid(w_floor + rectified_sigmoid(v_param), z, s, qmin, qmax)
        out = xq[idx] @ wq.T
        rec = (out - target_all[idx]).square().sum(dim=1).mean()
        penalty = rounding_penalty([v_param], it, iters, reg)
        loss = rec if penalty is None else rec + penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = on_grid(w_floor + (v_param >= 0).float(), z, s, qmin, qmax)
        layer.weight.copy_(hard.reshape(shape))
