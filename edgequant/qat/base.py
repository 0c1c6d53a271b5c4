"""The trainable quantizer base: a TensorQuantizer whose scale and zero point come from
learned parameters (LSQ, PACT) or running statistics (EMA) while the model trains.

The standard `scale` / `zero_point` buffers stay the single description of the grid that
everything downstream reads (the layers' integer form, the INT32 bias grid, the exporter, the
state dict): every training forward writes the grid it used into them, and switching to eval
(`model.eval()`, which `export_onnx` does on its copy) writes them from the current parameters.
In eval mode a trainable quantizer *is* its TensorQuantizer: it computes exactly what the PTQ
model with those buffers computes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from edgequant.quantizer import TensorQuantizer


def round_ste(x: Tensor) -> Tensor:
    """round() forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def pow2_ste(scale: Tensor) -> Tensor:
    """2^round(log2 scale), with the rounding passed straight through: a power-of-two grid from
    the first step, whose exponent still moves when the gradient pushes the scale far enough."""
    return torch.exp2(round_ste(torch.log2(scale)))


class QATQuantizer(TensorQuantizer):
    """Base class: built from a calibrated TensorQuantizer (same spec, name, role, buffers)."""

    range_learning = ""

    def __init__(self, source: TensorQuantizer) -> None:
        super().__init__(source.spec, source.name, source.role)
        if not source.calibrated or source.mode != "quantize":
            raise ValueError(
                f"quantizer {source.name!r}: QAT starts from a calibrated quantizer in mode "
                f"'quantize', got mode {source.mode!r}"
            )
        self.scale = source.scale.detach().clone().float()
        self.zero_point = source.zero_point.detach().clone().to(torch.int32)
        self.mode = "quantize"
        # Not self.train(): that syncs the buffers from parameters a subclass has not made yet.
        self.training = source.training

    @property
    def pow2(self) -> bool:
        return self.spec.scale_type == "pow2"

    def qparams(self) -> tuple[Tensor, Tensor]:
        """(scale, zero point as float) the next training forward uses, differentiable where
        they are learned."""
        raise NotImplementedError

    def train_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.mode != "quantize" or not self.training:
            return super().forward(x)
        return self.train_forward(x)

    @torch.no_grad()
    def _store(self, scale: Tensor, zero_point: Tensor) -> None:
        """Write the grid just used into the standard buffers."""
        self.scale.copy_(scale.detach().reshape(self.scale.shape))
        self.zero_point.copy_(
            torch.round(zero_point.detach()).reshape(self.zero_point.shape).to(torch.int32)
        )

    @torch.no_grad()
    def sync_(self) -> None:
        """Buffers <- the grid the current parameters define."""
        scale, zero_point = self.qparams()
        self._store(scale, zero_point)

    def train(self, mode: bool = True) -> QATQuantizer:
        super().train(mode)
        if not mode and self.calibrated:
            self.sync_()
        return self

    def to_tensor_quantizer(self) -> TensorQuantizer:
        """A plain TensorQuantizer in mode 'quantize' holding the current grid."""
        self.sync_()
        plain = TensorQuantizer(self.spec, self.name, self.role)
        plain.scale = self.scale.detach().clone()
        plain.zero_point = self.zero_point.detach().clone()
        plain.mode = "quantize"
        plain.train(self.training)
        return plain

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "range_learning": self.range_learning}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, range_learning={self.range_learning}"
