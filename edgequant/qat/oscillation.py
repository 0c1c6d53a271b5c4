"""Oscillation dampening for QAT (Nagel et al. 2022, "Overcoming oscillations in
quantization-aware training"): a loss term that pulls each latent weight towards the centre of
its quantization bin, so the straight-through estimator stops flipping it between two grid
points."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.qat.base import QATQuantizer


def dampening_loss(model: nn.Module) -> Tensor:
    """Oscillation dampening (Nagel et al. 2022, "Overcoming oscillations in quantization-aware
    training"): for every trained weight behind a QAT weight quantizer, the squared distance of
    the latent weight, clipped to the grid's range, from the grid point it rounds to, in grid
    steps, averaged over all those weights (so it lies in [0, 0.25] whatever the model's size and
    scales). The grid point and the steps are held fixed (no gradient): the term pulls each
    latent weight towards the centre of its bin, away from the rounding boundary where the STE
    keeps flipping it between two grid points, and leaves range learning alone. Being a mean,
    it pulls each of N weights with 2 d / (s^2 N) (d its distance from its grid point, s the
    step): the value stays comparable across models, the pull per weight does not."""
    total: Tensor | None = None
    count = 0
    for module in model.modules():
        q = getattr(module, "weight_quantizer", None)
        w = getattr(module, "weight", None)
        if not isinstance(q, QATQuantizer) or not isinstance(w, nn.Parameter):
            continue
        if not w.requires_grad or q.mode != "quantize":
            continue
        with torch.no_grad():
            scale, zp = q.qparams()
            s = F.broadcast_param(scale.detach().float(), w, q.axis, q.spec.group_size)
            z = F.broadcast_param(zp.detach().float(), w, q.axis, q.spec.group_size)
            grid = torch.clamp(torch.round(w / s + z), q.spec.qmin, q.spec.qmax) - z
            low, high = (q.spec.qmin - z) * s, (q.spec.qmax - z) * s
        steps = torch.minimum(torch.maximum(w, low), high) / s - grid
        term = steps.float().pow(2).sum()
        total = term if total is None else total + term
        count += w.numel()
    if total is None:
        raise ValueError(
            "dampen_weight > 0, but the model has no trained weight behind a QAT weight "
            "quantizer to dampen (are its weights quantized, and do they require grad?)"
        )
    return total / count


def dampen_ramp(done_steps: int, total_steps: int) -> float:
    """The dampening term's weight factor after `done_steps` of `total_steps`: near 0 at the
    first step, rising along a half cosine to 1 at the last, as the learning rate falls."""
    return 0.5 * (1.0 - math.cos(math.pi * min(done_steps / max(total_steps, 1), 1.0)))


__all__ = ["dampen_ramp", "dampening_loss"]
