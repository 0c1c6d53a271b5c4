"""LSQ and LSQ+: learned step size.
Esser et al., "Learned Step Size Quantization", ICLR 2020, section 2 (eq. 3, gradient scale
g = 1 / sqrt(N * Q_P)); Bhalgat et al., "LSQ+: Improving low-bit quantization through learnable
offsets and better initialization", CVPR-W 2020, section 3 (learned offset for asymmetric grids).

The step size `s` (here `learned_scale`, laid out like the `scale` buffer: 0-d per tensor, (C,)
per channel, param_shape per group) starts from the PTQ calibration. The forward and backward
are PyTorch's fused learnable fake-quantize kernels (per tensor, on large tensors: the same math
compiled by torch.compile, kernels.py), whose forward is bit for bit
`torch.fake_quantize_per_*_affine` and whose backward is LSQ's: d x_hat / d s =
round(x/s) - x/s inside the grid, qmin - z or qmax - z where clipped, times g; x gets the
straight-through gradient (1 inside the grid, 0 where clipped). The grid's scale is
max(|s|, SCALE_EPS), so it stays positive; a pow2 grid rounds log2(s) with the straight-through estimator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.qat.base import QATQuantizer, pow2_ste
from edgequant.qat.kernels import lsq_fake_quantize_per_tensor
from edgequant.quantizer import TensorQuantizer


def lsq_grad_scale(
    x: Tensor, role: str, axis: int | None, group_size: int | None, qmax: int
) -> float:
    """g = 1 / sqrt(N * Q_P): N = weights per scale (weights), features per sample (activations)."""
    if role == "weight":
        scales = math.prod(F.param_shape(x.shape, axis, group_size)) if axis is not None else 1
        n = x.numel() // max(scales, 1)
    else:
        n = x[0].numel() if x.dim() > 1 else x.numel()
    return 1.0 / math.sqrt(max(n, 1) * max(qmax, 1))


def learnable_fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None,
    group_size: int | None,
    grad_scale: float,
) -> Tensor:
    """Fake-quantize with gradients for x (STE), scale and zero point (LSQ), any granularity."""
    if axis is None:
        return lsq_fake_quantize_per_tensor(x, scale, zero_point, qmin, qmax, grad_scale)
    axis = axis % x.dim()
    if group_size is None:
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scale, zero_point, axis, qmin, qmax, grad_scale
        )
    rows = F.to_rows(x, axis, group_size)
    out = torch._fake_quantize_learnable_per_channel_affine(
        rows,
        F.scale_rows(scale, x, axis, group_size),
        F.scale_rows(zero_point, x, axis, group_size),
        0,
        qmin,
        qmax,
        grad_scale,
    )
    return F._from_rows(out, x, axis, group_size)


class LSQQuantizer(QATQuantizer):
    """Learned step size; with `learn_offset` (LSQ+, asymmetric grids) a learned zero point too."""

    range_learning = "lsq"

    def __init__(self, source: TensorQuantizer, learn_offset: bool = False) -> None:
        super().__init__(source)
        self.learn_offset = learn_offset and not self.spec.symmetric
        if self.learn_offset:
            self.range_learning = "lsq+"
        self.learned_scale = nn.Parameter(self.scale.detach().clone())
        zp = self.zero_point.detach().float().clone()
        self.learned_zero_point: Tensor | None = nn.Parameter(zp) if self.learn_offset else None

    def qparams(self) -> tuple[Tensor, Tensor]:
        # |s|, floored: positive whatever the optimizer does, differentiable, and no in-place
        # clamp (a quantizer applied twice in one forward, as at a residual join, would see its
        # saved parameter modified before the backward).
        scale = self.learned_scale.abs().clamp(min=F.SCALE_EPS)
        if self.pow2:
            scale = pow2_ste(scale)
        zp = (
            self.learned_zero_point.clamp(self.spec.qmin, self.spec.qmax)
            if self.learned_zero_point is not None
            else self.zero_point.float()
        )
        return scale, zp

    def train_forward(self, x: Tensor) -> Tensor:
        scale, zp = self.qparams()
        self._store(scale, zp)
        g = lsq_grad_scale(x, self.role, self.axis, self.spec.group_size, self.spec.qmax)
        return learnable_fake_quantize(
            x, scale, zp, self.spec.qmin, self.spec.qmax, self.axis, self.spec.group_size, g
        )
