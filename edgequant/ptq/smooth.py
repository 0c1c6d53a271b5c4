"""SmoothQuant: migrate activation outliers into the weights.
Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, section 4 (eq. 4): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

Each smoothed layer computes (X diag(s)^-1) (diag(s) W^T): the same product, but the per-channel
outliers of X are divided down and the weights, which quantize per output channel anyway, absorb
them. The division is an explicit per-channel multiply on the input (one elementwise op), so it
works whatever produced the input (a GELU, an attention product); where it can be folded into a
preceding LayerNorm it costs nothing, which a later pass may do.

One alpha for every layer (the paper's setting) is a compromise: a LayerNorm output with a few
outlier channels wants a large alpha, a GELU output a smaller one, and an input without outliers
none at all. `alpha="auto"` chooses per layer, from ALPHA_GRID and "no smoothing", the alpha
whose quantized layer (input on the layer's own static grid, weights on theirs) reproduces the
layer's float output best on the calibration data: argmin_alpha ||Q(X/s) Q(W diag(s))^T - X W^T||.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.instrument import batch_size, call_model
from edgequant.modules import QuantLinear
from edgequant.observers import OBSERVERS
from edgequant.ptq.calibrate import naming_the_batch

# Candidates of the per-layer search ("auto"): this grid, then half a step either side of its
# best; "no smoothing" (s = 1) is always a candidate too.
ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))
ALPHA_REFINE = 0.05
# Observers whose range the search takes as the exact min/max of X/s over every calibration row:
# minmax itself, and "auto", which picks its observer only after smoothing (by then the inputs
# are the smoothed ones), so the search cannot know its pick.
EXACT_RANGE_OBSERVERS = ("minmax", "auto")
# Token rows kept per calibration batch and layer for the per-layer search.
ROWS_PER_BATCH = 256


@dataclass
class InputStats:
    """What the calibration data showed at one Linear's input (features = in_features).

    amin/amax: per-channel min/max over every row; rows: a uniform sample of whole rows (R, in).
    """

    amin: Tensor
    amax: Tensor
    rows: list[Tensor] = field(default_factory=list)

    @property
    def absmax(self) -> Tensor:
        return torch.maximum(self.amax.abs(), self.amin.abs())


@torch.no_grad()
def input_stats(
    qmodel: nn.Module,
    batches: Iterable[Any],
    num_samples: int,
    rows_per_batch: int = 0,
    seed: int = 0,
) -> dict[str, InputStats]:
    """Per-channel ranges of every QuantLinear's input over the calibration data (quantizers as
    they are: uncalibrated, so the float model runs), plus up to rows_per_batch sampled rows per
    batch when rows_per_batch > 0."""
    stats: dict[str, InputStats] = {}
    gen = torch.Generator().manual_seed(seed)
    hooks = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            mn, mx = x.amin(dim=0), x.amax(dim=0)
            st = stats.get(name)
            if st is None:
                st = stats[name] = InputStats(mn, mx)
            else:
                st.amin, st.amax = torch.minimum(st.amin, mn), torch.maximum(st.amax, mx)
            if rows_per_batch > 0:
                pick = torch.randperm(x.shape[0], generator=gen)[:rows_per_batch]
                st.rows.append(x[pick].clone())

        return record

    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    seen = 0
    try:
        for index, batch in enumerate(batches):
            with naming_the_batch(batch, f"calib_data item {index}"):
                call_model(qmodel, batch, index)
            seen += batch_size(batch)
            if seen >= num_samples:
                break
    finally:
        for h in hooks:
            h.remove()
    return stats


def input_channel_absmax(
    qmodel: nn.Module, batches: Iterable[Any], num_samples: int
) -> dict[str, Tensor]:
    """max |x_j| over the calibration data of every QuantLinear's input channel j (float run)."""
    return {n: s.absmax for n, s in input_stats(qmodel, batches, num_samples).items()}


def smoothing_factors(amax_x: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """Eq. 4: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); amax_x (in,), weight (out, in)."""
    amax_w = weight.abs().amax(dim=0).float()
    return (amax_x.clamp(min=1e-5).pow(alpha) / amax_w.clamp(min=1e-5).pow(1.0 - alpha)).clamp(
        min=1e-5
    )


@torch.no_grad()
def layer_error(
    layer: QuantLinear, st: InputStats, s: Tensor | None, x: Tensor, ref: Tensor
) -> float:
    """Relative squared error of the layer's quantized output (smoothing factors s, None: none)
    against its float output ref = x W^T on the sampled rows x (R, in):
    ||Q(x/s) Q(W diag(s))^T - x W^T||^2 / ||x W^T||^2.

    The input grid is the layer's own spec: for minmax, the range of X/s over every calibration
    row (exact, from the per-channel ranges; also for "auto", see EXACT_RANGE_OBSERVERS); for
    other observers, what that observer makes of the sampled rows. The weights on the weight
    quantizer's spec, from W diag(s)."""
    iq, wq = layer.input_quantizer, layer.weight_quantizer
    assert iq is not None and wq is not None
    w = layer.weight.detach().float()
    inv = torch.ones_like(st.amax) if s is None else 1.0 / s
    xs, ws = x * inv, w if s is None else w * s
    spec = iq.spec
    if spec.observer in EXACT_RANGE_OBSERVERS:
        lo, hi = (st.amin * inv).min(), (st.amax * inv).max()
    else:
        observer = OBSERVERS[spec.observer](spec)
        observer(xs)
        lo, hi = observer.compute_range()
    scale, zp = F.calc_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    xq = F.fake_quantize(xs, scale, zp, spec.qmin, spec.qmax)
    wspec = wq.spec
    waxis = None if wspec.per_tensor else wspec.axis
    wmin, wmax = F.reduce_min_max(ws, waxis, wspec.group_size)
    wscale, wzp = F.calc_qparams(wmin, wmax, wspec.qmin, wspec.qmax, wspec.symmetric)
    wqd = F.fake_quantize(ws, wscale, wzp, wspec.qmin, wspec.qmax, waxis, wspec.group_size)
    err = (xq @ wqd.t() - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12)
    return float(err)


@torch.no_grad()
def choose_alpha(layer: QuantLinear, st: InputStats) -> tuple[float | None, float, float]:
    """(best alpha or None for no smoothing, its error, the error without smoothing)."""
    if not st.rows:
        raise ValueError(f"layer {layer.layer_name!r}: no sampled input rows to choose alpha on")
    x = torch.cat(st.rows)
    ref = x @ layer.weight.detach().float().t()
    base = layer_error(layer, st, None, x, ref)
    best: tuple[float | None, float] = (None, base)
    tried: dict[float, float] = {}

    def consider(alpha: float) -> None:
        nonlocal best
        if alpha in tried or not 0.0 <= alpha <= 1.0:
            return
        s = smoothing_factors(st.absmax, layer.weight, alpha)
        tried[alpha] = layer_error(layer, st, s, x, ref)
        if tried[alpha] < best[1]:
            best = (alpha, tried[alpha])

    for alpha in ALPHA_GRID:
        consider(alpha)
    if best[0] is not None:
        center = best[0]
        consider(round(center - ALPHA_REFINE, 2))
        consider(round(center + ALPHA_REFINE, 2))
    return best[0], best[1], base


def _check_alpha(alpha: float | str) -> None:
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(
                f"SmoothQuant alpha must be a number in [0, 1] or 'auto', got {alpha!r}"
            )
    elif not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1] or 'auto', got {alpha}")


@torch.no_grad()
def smooth_(
    qmodel: nn.Module, batches: Iterable[Any], alpha: float | str, num_samples: int
) -> dict[str, float | None]:
    """Smooth every QuantLinear of qmodel in place (its quantizers must not be calibrated yet).

    alpha: one migration strength for every layer, or "auto" to choose it per layer (see the
    module docstring). Returns {layer name: the alpha applied, None where smoothing did not
    help}; a layer whose input is not quantized is not smoothed and not listed.
    """
    return smooth_and_split_(qmodel, batches, alpha, num_samples)[0]


# --- Which inputs have outliers (the "auto" rule of Recipe.smooth_alpha and .split_outliers) -----
# An input has outlier channels when its largest per-channel range is more than OUTLIER_RATIO
# times the median per-channel range. Chosen on held-out calibration sentences of
# all-MiniLM-L6-v2 (calibrate on 0-63, score on 64-127; the evaluation sentences never), with
# the default pipeline (benchmarks/outlier_threshold_minilm.py,
# benchmarks/results/outlier_threshold_minilm.json): at 3 (32 of 37 Linear inputs flagged) mean
# cosine 0.99888 dynamic / 0.99928 static, at 6 (11 flagged) 0.99779 dynamic, at 12 (7 flagged)
# 0.99696 dynamic. MiniLM's ratios are 2.1-2.9 (attention contexts) or 3.9-18 (LayerNorm and
# GELU outputs), so any threshold in (2.94, 3.90) flags the same inputs as 3; 3.5 keeps the
# widest margin from ResNet-20's Linear head (1.92 on CIFAR-10 training images).
OUTLIER_RATIO = 3.5
# ...and when the channels above OUTLIER_RATIO x median are a few: at most this fraction of
# them. MiniLM's flagged inputs have 0.07-1.8 % of their channels there (calibration sentences
# 0-63); channels whose ranges spread evenly over two decades (unequal CNN channels, which
# cross-layer equalization and per-channel weights are for) have a quarter there.
MAX_OUTLIER_FRACTION = 0.1
# The quantile "auto" splits flagged inputs at (issue 10's held-out choice on all-MiniLM-L6-v2).
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
    """What smooth_and_split_ decided per Linear input, with the numbers behind it."""

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
def smooth_and_split_(
    qmodel: nn.Module,
    batches: Iterable[Any],
    alpha: float | str | None,
    num_samples: int,
    split: float | str | None = None,
) -> tuple[dict[str, float | None], dict[str, int]]:
    """Outlier channel splitting and SmoothQuant (see plan_outliers_); returns
    ({layer: alpha applied}, {layer: channels added})."""
    plan = plan_outliers_(qmodel, batches, alpha, num_samples, split)
    return plan.alphas, plan.added


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
        _check_alpha(alpha)
    if isinstance(split, str):
        if split != "auto":
            raise ValueError(
                f"outlier splitting quantile must be a number in (0, 1) or 'auto', got {split!r}"
            )
    elif split is not None:
        _check_quantile(split)
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
                st, inv, plan.added[name] = _split_layer(layer, st, float(quantile))
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


def describe_smoothing(done: dict[str, float | None]) -> str:
    """One line for the pipeline's steps: how many inputs were smoothed, with which alphas."""
    applied = [a for a in done.values() if a is not None]
    if not applied:
        return f"SmoothQuant: none of {len(done)} Linear inputs smoothed"
    alphas = sorted(set(applied))
    shown = f"alpha {alphas[0]}" if len(alphas) == 1 else f"alpha {alphas[0]}-{alphas[-1]}"
    return f"SmoothQuant ({shown}) on {len(applied)} of {len(done)} Linear inputs"


# --- Outlier channel splitting ------------------------------------------------------------------
# Zhao et al., "Improving Neural Network Quantization without Retraining using Outlier Channel
# Splitting", ICML 2019, applied to a Linear's input: a channel j whose range r_j (before
# smoothing, which then sees the split ranges) exceeds t, the `quantile` of the layer's
# per-channel ranges, is repeated
# m_j = ceil(r_j / t) times, each copy carrying x_j / m_j and the whole weight column W_j. The
# output is unchanged (m_j copies of W_j x_j / m_j), the per-tensor input grid covers about t
# instead of max_j r_j, and unlike SmoothQuant no weight column grows, so the weights' per-row
# grids stay as fine. The cost is the added columns: about (1 - quantile) of the channels. In the
# graph it is one Gather before the smoothing Mul (QuantMixin.transform_input).


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


def _check_quantile(quantile: float) -> None:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)):
        raise TypeError(f"outlier splitting quantile must be a number, got {quantile!r}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"outlier splitting quantile must be in (0, 1), got {quantile}")


def _split_layer(
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


def split_outliers_(
    qmodel: nn.Module, batches: Iterable[Any], quantile: float, num_samples: int
) -> dict[str, int]:
    """Split the outlier input channels of every QuantLinear whose input is quantized per tensor
    on its own (not by a quantizer the graph shares), in place, before calibration (and before
    smoothing: smooth_and_split_ does both). Returns {layer name: channels added} for every
    layer considered."""
    return smooth_and_split_(qmodel, batches, None, num_samples, quantile)[1]


def describe_split(added: dict[str, int]) -> str:
    """One line for the pipeline's steps."""
    split = {n: k for n, k in added.items() if k}
    if not split:
        return f"outlier channel splitting: no channel of {len(added)} Linear inputs split"
    return (
        f"outlier channel splitting: {sum(split.values())} channels added to {len(split)} of "
        f"{len(added)} Linear inputs"
    )
