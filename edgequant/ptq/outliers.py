"""The outlier rule behind Recipe.smooth_alpha="auto" and .split_outliers="auto": which Linear
inputs have outlier channels (a few channels far above the median channel range, as
transformers' LayerNorm and GELU outputs do), and the plan that splits (ptq/outlier_split.py)
and smooths (ptq/smoothquant.py) them in one calibration pass. The threshold was chosen on
held-out calibration sentences (benchmarks/outlier_threshold_minilm.py and its results file).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from edgequant.ptq.outlier_split import check_quantile, split_layer
from edgequant.ptq.smoothquant import (
    ROWS_PER_BATCH,
    check_alpha,
    choose_alpha,
    input_stats,
    smoothing_factors,
)

# An input has outlier channels when its largest per-channel range is more than OUTLIER_RATIO
# times the median per-channel range (chosen on held-out calibration sentences; see the module
# docstring), and at most MAX_OUTLIER_FRACTION of its channels are above that: channels whose
# ranges spread evenly (unequal CNN channels, which cross-layer equalization and per-channel
# weights are for) are not outliers.
OUTLIER_RATIO = 3.5
MAX_OUTLIER_FRACTION = 0.1
# The quantile "auto" splits flagged inputs at (a held-out choice on all-MiniLM-L6-v2).
AUTO_SPLIT_QUANTILE = 0.99


def has_outliers(absmax: Tensor) -> bool:
    """A few channels far above the rest: outlier_ratio > OUTLIER_RATIO, and at most
    MAX_OUTLIER_FRACTION of the (live) channels above OUTLIER_RATIO x their median range."""
    if outlier_ratio(absmax) <= OUTLIER_RATIO:
        return False
    live = absmax.double()[absmax > 0]
    above = (live > OUTLIER_RATIO * live.median()).double().mean()
    return float(above) <= MAX_OUTLIER_FRACTION


def outlier_ratio(absmax: Tensor) -> float:
    """max_j r_j / median_j r_j of the per-channel ranges r (in,), the median over the channels
    that move (r_j > 0): a ReLU network's dead channels set no grid and are no sign of outliers;
    1.0 where no channel moves."""
    r = absmax.double()
    live = r[r > 0]
    if live.numel() == 0:
        return 1.0
    return float(live.max() / live.median())


@dataclass
class OutlierPlan:
    """What plan_outliers_ decided per Linear input, with the numbers behind it."""

    alphas: dict[str, float | None] = field(default_factory=dict)  # SmoothQuant's, per layer
    added: dict[str, int] = field(default_factory=dict)  # channels added by splitting
    ratios: dict[str, float] = field(default_factory=dict)  # input max/median of every layer
    flagged: list[str] = field(default_factory=list)  # layers whose inputs has_outliers

    def reasons(self) -> list[str]:
        """One line per flagged layer: its ratio and what was done to it, for the summary."""
        lines = []
        for name in self.flagged:
            done = []
            if self.added.get(name):
                done.append(f"split {self.added[name]} channels")
            if self.alphas.get(name) is not None:
                done.append(f"SmoothQuant alpha {self.alphas[name]}")
            lines.append(
                f"{name}: input max/median {self.ratios[name]:.0f} > {OUTLIER_RATIO:g}: "
                + (", ".join(done) if done else "neither split nor smoothed")
            )
        return lines


@torch.no_grad()
def plan_outliers_(
    qmodel: nn.Module,
    batches: Iterable[Any],
    alpha: float | str | None,
    num_samples: int,
    split: float | str | None = None,
) -> OutlierPlan:
    """Outlier channel splitting (split: the quantile, "auto": AUTO_SPLIT_QUANTILE on the inputs
    with outliers, None: off; see below), then SmoothQuant (alpha: one for every layer; "auto":
    chosen per layer, see choose_alpha, on the inputs with outliers; None: off) of the split
    input, in one calibration pass, in place, before the quantizers are calibrated. Splitting
    comes first so that the smoothing factors see the split ranges: an outlier channel split m
    ways needs a factor about m^alpha smaller, and its weight column grows that much less.

    An input "has outliers" as has_outliers says (a few channels above OUTLIER_RATIO times the
    median channel range); the other inputs are left as they are by "auto" (a number applies
    to every input)."""
    if alpha is not None:
        check_alpha(alpha)
    if isinstance(split, str):
        if split != "auto":
            raise ValueError(
                f"outlier splitting quantile must be a number in (0, 1) or 'auto', got {split!r}"
            )
    elif split is not None:
        check_quantile(split)
    auto = alpha == "auto"
    batches = list(batches) if auto else batches
    stats = input_stats(qmodel, batches, num_samples, rows_per_batch=ROWS_PER_BATCH if auto else 0)
    plan = OutlierPlan()
    for name, st in stats.items():
        layer: Any = qmodel.get_submodule(name)
        if layer.input_quantizer is None or layer.weight_quantizer is None:
            continue
        if layer.input_smooth_inv is not None or layer.input_channel_index is not None:
            what = "smoothed" if layer.input_channel_index is None else "split"
            raise ValueError(f"layer {name!r} is already {what}")
        if not (torch.isfinite(st.amin).all() and torch.isfinite(st.amax).all()):
            raise ValueError(
                f"layer {name + '.input'!r}: calibration produced NaN or Inf in this tensor "
                "(check the calibration data and the layers before it)"
            )
        plan.ratios[name] = outlier_ratio(st.absmax)
        flagged = has_outliers(st.absmax)
        if flagged:
            plan.flagged.append(name)
        inv: Tensor | None = None
        quantile = AUTO_SPLIT_QUANTILE if split == "auto" else split
        if (
            quantile is not None
            and layer.input_quantizer.spec.per_tensor
            and not layer.shared_input
        ):
            if split != "auto" or flagged:
                st, inv, plan.added[name] = split_layer(layer, st, float(quantile))
            else:
                plan.added[name] = 0
        chosen: float | None = None
        if alpha is not None:
            if not auto:
                chosen = float(alpha)
            elif flagged:
                chosen = choose_alpha(layer, st)[0]
            plan.alphas[name] = chosen
        if chosen is not None:
            s = smoothing_factors(st.absmax, layer.weight, chosen)
            layer.weight.mul_(s.to(layer.weight.dtype).reshape(1, -1))
            inv = 1.0 / s if inv is None else inv / s
        if inv is not None:
            layer.input_smooth_inv = inv.to(layer.weight.dtype)
    return plan


@torch.no_grad()
def smooth_(
    qmodel: nn.Module, batches: Iterable[Any], alpha: float | str, num_samples: int
) -> dict[str, float | None]:
    """Smooth every QuantLinear of qmodel in place (its quantizers must not be calibrated yet).

    alpha: one migration strength for every layer, or "auto" to choose it per layer (see the
    module docstring). Returns {layer name: the alpha applied, None where smoothing did not
    help}; a layer whose input is not quantized is not smoothed and not listed.
    """
    return plan_outliers_(qmodel, batches, alpha, num_samples).alphas


def split_outliers_(
    qmodel: nn.Module, batches: Iterable[Any], quantile: float, num_samples: int
) -> dict[str, int]:
    """Split the outlier input channels of every QuantLinear whose input is quantized per tensor
    on its own (not by a quantizer the graph shares), in place, before calibration (and before
    smoothing: plan_outliers_ does both). Returns {layer name: channels added} for every
    layer considered."""
    return plan_outliers_(qmodel, batches, None, num_samples, quantile).added
