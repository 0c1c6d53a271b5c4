"""PACT: a learned clipping level for activations.
Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural Networks", 2018,
section 2 (eq. 1-3): y = clip(x, 0, alpha) quantized on [0, alpha]; d y / d alpha = 1 where
x >= alpha and 0 elsewhere (the quantization noise inside the range is passed straight through).

Here alpha is the top of the calibrated grid, (qmax - zero_point) * scale, so the grid is
scale = alpha / (qmax - zero_point) with the zero point kept from calibration (0 after a ReLU);
a symmetric grid clips at -alpha too, and gets the gradient there with the opposite sign. The
forward is PyTorch's fused fake-quantize (bit for bit the PTQ model's). Weights do not have a
PACT form: under range_learning 'pact' they follow their own min/max (see ema.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.qat.base import QATQuantizer, pow2_ste
from edgequant.quantizer import TensorQuantizer


class _PACTFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        zp = torch.round(zero_point).to(torch.int32)
        out, in_range = _cachemask(x, scale, zp, qmin, qmax)
        ctx.save_for_backward(x, in_range)
        ctx.levels = (float(qmin) - float(zp), float(qmax) - float(zp))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        x, in_range = ctx.saved_tensors
        low_levels, high_levels = ctx.levels
        grad_x = grad * in_range
        clipped = grad.masked_fill(in_range, 0.0)
        high = clipped.masked_fill(x < 0, 0.0).sum()
        low = clipped.masked_fill(x >= 0, 0.0).sum()
        # d y / d scale where clipped: y = (qmax - z) * scale above, (qmin - z) * scale below.
        grad_scale = high * high_levels + low * low_levels
        return grad_x, grad_scale.reshape(()), None, None, None


def _cachemask(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> tuple[Tensor, Tensor]:
    """PyTorch's fused fake-quantize and its in-range mask."""
    out, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(
        x, float(scale), int(zero_point), qmin, qmax
    )
    return out, mask


class PACTQuantizer(QATQuantizer):
    """A per-tensor activation grid whose clipping level alpha is learned."""

    range_learning = "pact"

    def __init__(self, source: TensorQuantizer) -> None:
        super().__init__(source)
        if self.role != "activation" or not self.spec.per_tensor:
            raise ValueError(
                f"quantizer {self.name!r}: PACT learns one clipping level per activation tensor; "
                f"got role {self.role!r}, granularity {self.spec.granularity!r}"
            )
        top = float(self.spec.qmax - int(self.zero_point.reshape(())))
        if top <= 0:
            raise ValueError(
                f"quantizer {self.name!r}: its calibrated grid has no positive levels "
                f"(zero point {int(self.zero_point.reshape(()))} = qmax); PACT cannot clip it"
            )
        self.levels_above_zero = top
        self.alpha = nn.Parameter((self.scale.detach().reshape(()) * top).clone())

    def qparams(self) -> tuple[Tensor, Tensor]:
        # |alpha|, floored: positive, differentiable, never modified in place (see lsq.py).
        scale = (
            self.alpha.abs().clamp(min=F.SCALE_EPS * self.levels_above_zero)
            / self.levels_above_zero
        )
        if self.pow2:
            scale = pow2_ste(scale)
        return scale, self.zero_point.float().reshape(())

    def train_forward(self, x: Tensor) -> Tensor:
        scale, zp = self.qparams()
        self._store(scale, zp)
        out: Tensor = _PACTFakeQuant.apply(x, scale, zp, self.spec.qmin, self.spec.qmax)
        return out
