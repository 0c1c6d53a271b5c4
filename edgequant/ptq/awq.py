"""Activation-aware weight scaling: Lin et al. 2023, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration" (MLSys 2024), section 3.2.

A few input channels of a Linear carry much larger activations than the rest; the weights that
multiply them matter most. Scaling those weight columns up by s (and the input down by s, folded
into the op that produces the input: a norm's weight, or the rows of the Linear before) puts
them on a finer grid relative to their size. AWQ's search space is s = mean|x|^alpha per input
channel, alpha in [0, 1) on a grid, normalised so that sqrt(max(s) min(s)) = 1; alpha = 0 is no
scaling. Here the objective is the layers' exact output error on all calibration tokens,
sum_l ||X diag(1/s) (Q(W_l diag(s)) - W_l diag(s))^T||^2 = sum_l tr(E_l H E_l^T) with
H = X^T X, so the search needs H and mean|x|, never the tokens themselves.

Shapes: weights (out, in); h (in, in); x_abs_mean (in,).
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgequant import functional as F
from edgequant.spec import QuantSpec

ALPHA_GRID = tuple(i / 20 for i in range(20))  # AWQ's grid: 0, 0.05, ..., 0.95


def round_to_nearest(w: Tensor, spec: QuantSpec) -> Tensor:
    """w (out, in) on the min/max grid of `spec` (per output channel or per group of inputs)."""
    if spec.granularity == "group":
        axis, group = 1, spec.group_size
    elif spec.granularity == "channel":
        axis, group = 0, None
    else:
        axis, group = None, None
    lo, hi = F.reduce_min_max(w, axis, group)
    scale, zp = F.calc_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    return F.fake_quantize(w, scale, zp, spec.qmin, spec.qmax, axis, group)


def output_error(weights: list[Tensor], quantized: list[Tensor], h: Tensor) -> float:
    """sum_l tr(E_l H E_l^T), E_l = quantized_l - weights_l: the summed squared output error on
    the inputs whose X^T X is h."""
    total = 0.0
    for w, q in zip(weights, quantized, strict=True):
        e = (q - w).float()
        total += float(((e @ h) * e).sum())
    return total


def search_scales(
    weights: list[Tensor],
    specs: list[QuantSpec],
    h: Tensor,
    x_abs_mean: Tensor,
    alphas: tuple[float, ...] = ALPHA_GRID,
) -> tuple[Tensor, float, float, float]:
    """(s, alpha, error at alpha 0, error at the chosen alpha) for Linears that read the same
    input: the per-input-channel factors s (in,) that minimise the layers' summed output error
    under round to nearest when each W becomes W diag(s) and the input x / s."""
    hf = h.float()
    base = x_abs_mean.float().clamp(min=1e-8)
    best: tuple[float, float, Tensor] | None = None
    plain = float("nan")
    for alpha in alphas:
        s = base.pow(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        quantized = [
            round_to_nearest(w.float() * s, spec) / s
            for w, spec in zip(weights, specs, strict=True)
        ]
        err = output_error([w.float() for w in weights], quantized, hf)
        if alpha == 0:
            plain = err
        if best is None or err < best[1]:
            best = (alpha, err, s)
    assert best is not None
    alpha, err, s = best
    return s, alpha, plain, err
