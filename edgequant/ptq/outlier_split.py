"""Outlier channel splitting of a Linear's input.
Zhao et al., "Improving Neural Network Quantization without Retraining using Outlier Channel
Splitting", ICML 2019.

A channel j whose range r_j exceeds t, the `quantile` of the layer's per-channel ranges, is
repeated m_j = ceil(r_j / t) times, each copy carrying x_j / m_j and the whole weight column W_j.
The output is unchanged (m_j copies of W_j x_j / m_j), the per-tensor input grid covers about t
instead of max_j r_j, and unlike SmoothQuant no weight column grows, so the weights' per-row grids
stay as fine. The cost is the added columns: about (1 - quantile) of the channels. In the graph it
is one Gather before the smoothing Mul (QuantMixin.transform_input). Splitting runs before
smoothing, which then sees the split ranges (ptq/outliers.py runs both).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgequant.modules import QuantLinear
from edgequant.ptq.smoothquant import InputStats


def resize_input(layer: QuantLinear, width: int) -> None:
    """Give a Linear `width` input columns (a placeholder weight: loading fills it)."""
    layer.weight = nn.Parameter(layer.weight.new_zeros(layer.out_features, width))
    layer.in_features = width


# At most this many copies of one channel: where most channels are (near) zero, the quantile
# is too, and the plain rule would repeat a channel without bound.
MAX_COPIES = 32


def split_factors(ranges: Tensor, quantile: float) -> Tensor:
    """m_j = ceil(r_j / t), t the quantile of the ranges (r: (in,) per-channel max |x|), but
    t at least max_j r_j / MAX_COPIES."""
    r = ranges.double()
    threshold = torch.maximum(torch.quantile(r, quantile), r.max() / MAX_COPIES).clamp(min=1e-12)
    return torch.ceil(r / threshold).clamp(min=1).long()


def check_quantile(quantile: float) -> None:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)):
        raise TypeError(f"outlier splitting quantile must be a number, got {quantile!r}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"outlier splitting quantile must be in (0, 1), got {quantile}")


def split_layer(
    layer: QuantLinear, st: InputStats, quantile: float
) -> tuple[InputStats, Tensor | None, int]:
    """Split the layer's outlier input channels (its weight gets the repeated columns, its
    input_channel_index the gather); returns the input's statistics as split, the shares
    1 / m_j of the split channels (None if nothing split) and the number of channels added."""
    mult = split_factors(st.absmax, quantile)
    extra = int((mult - 1).sum())
    if extra == 0:
        return st, None, 0
    index = torch.repeat_interleave(torch.arange(mult.numel()), mult)
    share = (1.0 / mult.double())[index].float()
    weight = layer.weight.detach()[:, index].clone()
    resize_input(layer, index.numel())
    layer.weight.copy_(weight)
    layer.input_channel_index = index.to(layer.weight.device)
    split = InputStats(
        st.amin[index] * share, st.amax[index] * share, [r[:, index] * share for r in st.rows]
    )
    return split, share, extra


def describe_split(added: dict[str, int]) -> str:
    """One line for the pipeline's steps."""
    split = {n: k for n, k in added.items() if k}
    if not split:
        return f"outlier channel splitting: no channel of {len(added)} Linear inputs split"
    return (
        f"outlier channel splitting: {sum(split.values())} channels added to {len(split)} of "
        f"{len(added)} Linear inputs"
    )
