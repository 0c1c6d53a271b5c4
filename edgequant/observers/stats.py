"""Shape-free statistics that survive many batches of different shapes (variable sequence
length): per-tensor histograms that grow by doubling their range (so old bins merge exactly,
pairwise), and per-channel/per-group bounded samples of each row."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from edgequant import functional as F

if TYPE_CHECKING:
    pass


class Histogram:
    """Counts of values in `bins` equal bins over [lo, lo + width].

    When a batch falls outside, the range doubles (up or down) and old bins merge pairwise, so
    merging batches of any shape and range is exact: no count is ever split or interpolated. The
    data then fill at least a quarter of the bins (half when `from_zero`). The exact min and max
    are kept beside the counts.
    """

    def __init__(self, bins: int, from_zero: bool = False) -> None:
        if bins < 16 or bins % 2:
            raise ValueError(f"histogram bins={bins!r} must be an even number >= 16")
        self.bins = bins
        self.from_zero = from_zero
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.lo = 0.0
        self.width = 0.0
        self.min_val = math.inf
        self.max_val = -math.inf
        self.total = 0

    def add(self, values: Tensor) -> None:
        flat = values.reshape(-1).double()
        mn, mx = float(flat.min()), float(flat.max())
        if self.total == 0:
            self.lo = 0.0 if self.from_zero else mn
            # One spare bin on top: every value lies in a half-open bin [edge, next edge), also
            # after the range grows (a closed top bin would leave the old max one bin low).
            self.width = (mx - self.lo) * self.bins / (self.bins - 1)
            if self.width <= 0.0:
                # A constant first batch: any positive width works, later batches grow it.
                self.width = abs(self.lo) * 2.0**-20 if self.lo != 0.0 else 2.0**-149
        while mn < self.lo or mx >= self.lo + self.width:
            merged = self.counts.view(self.bins // 2, 2).sum(dim=1)
            empty = torch.zeros_like(merged)
            if mn < self.lo:
                self.counts = torch.cat([empty, merged])
                self.lo -= self.width
            else:
                self.counts = torch.cat([merged, empty])
            self.width *= 2.0
        index = torch.floor((flat - self.lo) * (self.bins / self.width)).long()
        index = index.clamp_(0, self.bins - 1)
        self.counts += torch.bincount(index, minlength=self.bins).double()
        self.min_val, self.max_val = min(self.min_val, mn), max(self.max_val, mx)
        self.total += flat.numel()

    def edges(self) -> Tensor:
        return self.lo + torch.arange(self.bins + 1, dtype=torch.float64) * (self.width / self.bins)

    def centers(self) -> Tensor:
        return self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (
            self.width / self.bins
        )

    def quantile(self, q: float) -> float:
        """The value below which a fraction q of the counts lie (linear inside a bin), clamped to
        the exact min and max."""
        cdf = torch.cumsum(self.counts, 0)
        target = q * float(cdf[-1])
        j = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0])
        j = min(j, self.bins - 1)
        below = float(cdf[j - 1]) if j > 0 else 0.0
        inside = float(self.counts[j])
        frac = (target - below) / inside if inside > 0 else 0.0
        value = self.lo + (j + min(max(frac, 0.0), 1.0)) * (self.width / self.bins)
        return min(max(value, self.min_val), self.max_val)


class RowSample:
    """A bounded sample of each row of `functional.to_rows(x)` (one row per channel or group).

    Batches whose other dims differ merge along the row; past `max_per_row` elements a seeded,
    proportional subsample keeps every batch represented by its share of the elements seen.
    """

    def __init__(self, max_per_row: int, seed: int) -> None:
        if max_per_row < 1:
            raise ValueError(f"max_samples_per_row={max_per_row!r} must be >= 1")
        self.max_per_row = max_per_row
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Tensor | None = None
        self.seen = 0

    def _pick(self, n: int, k: int) -> Tensor:
        return torch.randperm(n, generator=self.generator)[:k].sort().values

    def add(self, rows: Tensor) -> None:
        n = rows.shape[1]
        old = rows[:, :0] if self.rows is None else self.rows
        if old.shape[1] + n <= self.max_per_row:
            self.rows = torch.cat([old, rows], dim=1)
        else:
            keep_old = min(old.shape[1], round(self.max_per_row * self.seen / (self.seen + n)))
            keep_new = min(n, self.max_per_row - keep_old)
            self.rows = torch.cat(
                [old[:, self._pick(old.shape[1], keep_old)], rows[:, self._pick(n, keep_new)]],
                dim=1,
            )
        self.seen += n


def rows_to_params(
    values: Tensor, shape: tuple[int, ...], axis: int, group_size: int | None
) -> Tensor:
    """Per-row values (one per row of `functional.to_rows`) laid out as `functional.param_shape`."""
    pshape = F.param_shape(shape, axis, group_size)
    if group_size is None:
        return values.reshape(pshape)
    moved = tuple(s for i, s in enumerate(pshape) if i != axis) + (pshape[axis],)
    return values.reshape(moved).movedim(-1, axis)


def row_quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row quantile with linear interpolation (numpy's default), with no size limit."""
    ordered = torch.sort(rows.double(), dim=1).values
    pos = q * (rows.shape[1] - 1)
    below = math.floor(pos)
    above = min(below + 1, rows.shape[1] - 1)
    frac = pos - below
    return ordered[:, below] + frac * (ordered[:, above] - ordered[:, below])
