"""Clipping search by output error: each weight group's (or output channel's) range is shrunk to
the ratio whose rounding error costs the layer's output least on the calibration inputs, as
AWQ's clipping step does (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", section 3.3 / the released code's `auto_clip`).

With inputs X (tokens, in) and H = X^T X, a weight error E (out, in) costs ||X E^T||^2 =
sum_rows e H e^T. Per output channel (one scale a row) the search minimises e H e^T per row
exactly; per group it minimises each group's own term e_g H_gg e_g^T (H_gg: the group's diagonal
block of H), which is what AWQ's clipping measures. The min/max (or MSE) observer minimises
e e^T instead, which treats every input channel as equally loud.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.modules import QuantMixin

# Shrink ratios tried: max|w| x ratio becomes the grid's end.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


def supports(layer: QuantMixin) -> str | None:
    """None when the clipping search applies to `layer`, else why not."""
    wq = layer.weight_quantizer
    if wq is None or not isinstance(layer, nn.Linear):
        return "not a quantized Linear"
    spec = wq.spec
    if spec.scale_type == "pow2":
        return "power-of-two scales"
    if spec.granularity == "group" and wq.axis == 1:
        return None
    if spec.granularity == "channel" and wq.axis == 0:
        return None
    return f"{spec.short()} grid"


def _blocks(h: Tensor, group_size: int) -> Tensor:
    """The diagonal blocks of h (in, in) as (groups, group_size, group_size)."""
    g = h.shape[0] // group_size
    return torch.stack(
        [
            h[i * group_size : (i + 1) * group_size, i * group_size : (i + 1) * group_size]
            for i in range(g)
        ]
    )


def search_clipping(
    layer: QuantMixin, h: Tensor, ratios: tuple[float, ...] = CLIP_RATIOS
) -> Tensor:
    """Set the layer's weight quantizer to the per-row (per-channel grid) or per-(row, group)
    range ratio that minimises the output error under round to nearest; returns the ratios
    chosen, shaped like the quantizer's scale. h: (in, in), the inputs' X^T X."""
    why = supports(layer)
    if why is not None:
        raise ValueError(f"layer {getattr(layer, 'layer_name', '?')!r}: no clipping search ({why})")
    wq = layer.weight_quantizer
    assert wq is not None
    spec = wq.spec
    w = layer.weight.detach().double()
    out_features, in_features = w.shape
    group = spec.group_size if spec.granularity == "group" else in_features
    assert group is not None
    groups = in_features // group
    wg = w.reshape(out_features, groups, group)
    hd = h.double()
    hb = _blocks(hd, group) if groups > 1 else hd.unsqueeze(0)
    if spec.symmetric:
        lo_base = hi_base = wg.abs().amax(dim=2)
        lo_base = -lo_base
    else:
        lo_base, hi_base = wg.amin(dim=2).clamp(max=0), wg.amax(dim=2).clamp(min=0)
    best = torch.full((out_features, groups), float("inf"), dtype=torch.float64)
    chosen = torch.ones(out_features, groups, dtype=torch.float64)
    for r in ratios:
        scale, zp = F.calc_qparams(
            (lo_base * r).float(), (hi_base * r).float(), spec.qmin, spec.qmax, spec.symmetric
        )
        s, z = scale.double().unsqueeze(2), zp.double().unsqueeze(2)
        e = wg - (torch.clamp(torch.round(wg / s) + z, spec.qmin, spec.qmax) - z) * s
        cost = torch.einsum("ogi,gij,ogj->og", e, hb, e)
        better = cost < best
        best = torch.where(better, cost, best)
        chosen = torch.where(better, torch.full_like(chosen, r), chosen)
    lo, hi = (lo_base * chosen).float(), (hi_base * chosen).float()
    shape = wq.scale.shape if wq.calibrated else None
    if spec.granularity == "channel":
        lo, hi = lo.reshape(out_features), hi.reshape(out_features)
    with torch.no_grad():
        wq.set_range(lo, hi)
    if shape is not None and wq.scale.shape != shape:
        wq.scale = wq.scale.reshape(shape)
        wq.zero_point = wq.zero_point.reshape(shape)
    wq.set_mode("quantize")
    return chosen.reshape(wq.scale.shape)
