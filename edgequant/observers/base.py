"""The Observer base class and the two observers that keep running bounds: min/max and EMA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from edgequant import functional as F

if TYPE_CHECKING:
    from edgequant.spec import QuantSpec


class Observer(nn.Module):
    """Base class: keeps the spec and the granularity arguments."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.axis: int | None = None if spec.per_tensor else spec.axis
        self.group_size: int | None = spec.group_size
        self.batches = 0
        self._first_shape: tuple[int, ...] | None = None

    def forward(self, x: Tensor) -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _need_data(self) -> None:
        if self.batches == 0:
            raise RuntimeError(
                f"{type(self).__name__}: compute_range() before any data was observed"
            )

    def _check_batch(self, x: Tensor) -> Tensor:
        """The batch as a detached float32 tensor, after the checks every observer needs."""
        name = type(self).__name__
        if x.numel() == 0:
            raise ValueError(f"{name}: the observed tensor is empty (shape {tuple(x.shape)})")
        x = x.detach().float()
        # One reduction instead of a boolean tensor: amax propagates NaN and keeps Inf.
        if not bool(torch.isfinite(x.abs().amax())):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(torch.isinf(x).sum())
            raise ValueError(
                f"{name}: the observed tensor holds NaN/Inf ({n_nan} NaN, {n_inf} Inf among "
                f"{x.numel()} values of shape {tuple(x.shape)})"
            )
        if self.axis is not None:
            shape = tuple(x.shape)
            if self._first_shape is None:
                self._first_shape = shape
            else:
                first = self._first_shape
                # Per-channel ranges only need the channel count to agree; per-group ranges are
                # laid out over the whole shape, so every batch must have the same shape.
                if self.group_size is None:
                    same = len(shape) == len(first) and shape[self.axis] == first[self.axis]
                else:
                    same = shape == first
                if not same:
                    raise ValueError(
                        f"{name}: batch of shape {shape} does not match the first batch's {first} "
                        f"at granularity {self.spec.granularity!r} (axis {self.axis})"
                    )
        return x


class _RunningRange(Observer):
    """Keeps min_val and max_val buffers; `_merge` says how a batch's range updates them."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _merge(self, mn: Tensor, mx: Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        x = self._check_batch(x)
        mn, mx = F.reduce_min_max(x, self.axis, self.group_size)
        if self.batches == 0:
            self.min_val, self.max_val = mn, mx
        else:
            self._merge(mn, mx)
        self.batches += 1

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self._need_data()
        return self.min_val.clone(), self.max_val.clone()


class MinMaxObserver(_RunningRange):
    """The running min and max of everything seen."""

    def _merge(self, mn: Tensor, mx: Tensor) -> None:
        self.min_val, self.max_val = (
            torch.minimum(self.min_val, mn),
            torch.maximum(self.max_val, mx),
        )


class EMAObserver(_RunningRange):
    """Exponential moving average of each batch's min and max (the first batch initialises):
    range <- range + momentum * (batch range - range)."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.01) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"EMAObserver: momentum={momentum!r} must be in (0, 1]")
        super().__init__(spec)
        self.momentum = float(momentum)

    def _merge(self, mn: Tensor, mx: Tensor) -> None:
        self.min_val = self.min_val + self.momentum * (mn - self.min_val)
        self.max_val = self.max_val + self.momentum * (mx - self.max_val)
