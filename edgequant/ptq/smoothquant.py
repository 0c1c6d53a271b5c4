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
from edgequant.batches import batch_size, call_model, naming_the_batch
from edgequant.modules import QuantLinear
from edgequant.observers import OBSERVERS

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


def check_alpha(alpha: float | str) -> None:
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(
                f"SmoothQuant alpha must be a number in [0, 1] or 'auto', got {alpha!r}"
            )
    elif not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1] or 'auto', got {alpha}")


def describe_smoothing(done: dict[str, float | None]) -> str:
    """One line for the pipeline's steps: how many inputs were smoothed, with which alphas."""
    applied = [a for a in done.values() if a is not None]
    if not applied:
        return f"SmoothQuant: none of {len(done)} Linear inputs smoothed"
    alphas = sorted(set(applied))
    shown = f"alpha {alphas[0]}" if len(alphas) == 1 else f"alpha {alphas[0]}-{alphas[-1]}"
    return f"SmoothQuant ({shown}) on {len(applied)} of {len(done)} Linear inputs"
