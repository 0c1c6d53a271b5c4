"""EMA ranges: the grid follows an exponential moving average of each batch's min and max,
as in Jacob et al., "Quantization and Training of Integer-Arithmetic-Only Inference", CVPR
2018, section 3.1 (activations), and the current min/max of the weights for weights.

The average starts from the calibrated grid (its ends), not from the first training batch.
Under DistributedDataParallel every rank reduces its batch's min and max with all_reduce
(MIN / MAX) before the update, so each rank averages the range of the global batch and the
quantizers stay identical on every rank (nothing is overwritten from rank 0).
`freeze()` stops the updates (the fit_qat schedule's freeze_observers_epoch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from edgequant import functional as F
from edgequant.qat.base import QATQuantizer
from edgequant.quantizer import TensorQuantizer

MOMENTUM = 0.01  # torch.ao's averaging constant


def all_reduce_range(min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
    """The global min and max over all ranks (unchanged outside a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        min_val, max_val = min_val.clone(), max_val.clone()
        dist.all_reduce(min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(max_val, op=dist.ReduceOp.MAX)
    return min_val, max_val


class EMAQuantizer(QATQuantizer):
    """Activations: EMA of the batch range. Weights: the range of the current weights."""

    range_learning = "ema"
    running_min: Tensor
    running_max: Tensor

    def __init__(self, source: TensorQuantizer, momentum: float = MOMENTUM) -> None:
        super().__init__(source)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1], got {momentum!r}")
        self.momentum = momentum
        self.frozen = False
        zp = self.zero_point.float()
        # The calibrated grid's ends: the range calc_qparams maps back onto this grid (a
        # symmetric signed grid maps max|x| onto qmax, so its low end is -qmax, not qmin).
        low = -self.spec.qmax if self.spec.symmetric and self.spec.signed else self.spec.qmin
        self.register_buffer("running_min", ((low - zp) * self.scale).clone())
        self.register_buffer("running_max", ((self.spec.qmax - zp) * self.scale).clone())

    def freeze(self) -> None:
        self.frozen = True

    def qparams(self) -> tuple[Tensor, Tensor]:
        return self.scale, self.zero_point.float()

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        mn, mx = F.reduce_min_max(x.detach(), self.axis, self.spec.group_size)
        if self.role == "activation":
            mn, mx = all_reduce_range(mn.float(), mx.float())
            mn = self.running_min + self.momentum * (mn - self.running_min)
            mx = self.running_max + self.momentum * (mx - self.running_max)
        # Weights are identical on every rank (DDP averages their gradients): no reduction.
        self.running_min.copy_(mn.reshape(self.running_min.shape))
        self.running_max.copy_(mx.reshape(self.running_max.shape))
        scale, zero_point = F.calc_qparams(
            self.running_min,
            self.running_max,
            self.spec.qmin,
            self.spec.qmax,
            self.spec.symmetric,
            pow2=self.pow2,
        )
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))

    def train_forward(self, x: Tensor) -> Tensor:
        if not self.frozen:
            self._update(x)
        return self.fake_quantize_stored(x)

    def sync_(self) -> None:
        """The buffers are the grid already: nothing to derive."""

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "frozen": self.frozen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.frozen = bool(state.get("frozen", False)) if isinstance(state, dict) else False
