"""Observers that choose a range from a sample of each row: percentile and MSE."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from edgequant import functional as F

if TYPE_CHECKING:
    from edgequant.spec import QuantSpec
from edgequant.observers.base import Observer
from edgequant.observers.stats import Histogram, RowSample, row_quantile, rows_to_params


class SampledObserver(Observer):
    """Shared plumbing: per-tensor statistics in a histogram, per-channel/group in row samples."""

    def __init__(
        self, spec: QuantSpec, hist_bins: int, max_samples_per_row: int, seed: int
    ) -> None:
        super().__init__(spec)
        self.hist = Histogram(hist_bins)
        self.sample = RowSample(max_samples_per_row, seed)

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        x = self._check_batch(x)
        if self.axis is None:
            self.hist.add(x)
        else:
            axis = x.dim() + self.axis if self.axis < 0 else self.axis
            F.check_granularity(x, axis, self.group_size)
            self.sample.add(F.to_rows(x, axis, self.group_size))
        self.batches += 1

    def _to_params(self, values: Tensor) -> Tensor:
        assert self._first_shape is not None and self.axis is not None
        axis = self.axis % len(self._first_shape)
        return rows_to_params(values.float(), self._first_shape, axis, self.group_size)


class PercentileObserver(SampledObserver):
    """Range = the `percentile`-th percentile on the high side and the (100 - percentile)-th on
    the low side. Per tensor from a merged histogram; per channel/group exactly, on a bounded
    sample of each row."""

    def __init__(
        self,
        spec: QuantSpec,
        percentile: float = 99.99,
        hist_bins: int = 16384,
        max_samples_per_row: int = 65536,
        seed: int = 0,
    ) -> None:
        super().__init__(spec, hist_bins, max_samples_per_row, seed)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"PercentileObserver: percentile={percentile!r} must be in (50, 100]")
        self.percentile = float(percentile)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self._need_data()
        q = self.percentile / 100.0
        if self.axis is None:
            lo, hi = self.hist.quantile(1.0 - q), self.hist.quantile(q)
            return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
        assert self.sample.rows is not None
        rows = self.sample.rows
        return self._to_params(row_quantile(rows, 1.0 - q)), self._to_params(row_quantile(rows, q))


class MSEObserver(SampledObserver):
    """The clipping range that minimises the mean squared error of `functional.fake_quantize`
    against the data on the spec's grid.

    Candidates are fractions 1/n..n/n of the observed range; asymmetric grids then refine each end
    on its own (low end, then high end). Per tensor the error is measured on the merged histogram
    (bin centres weighted by counts, so memory is fixed); per channel/group on the rows themselves
    (weights are observed once, so that is the weight tensor).
    """

    def __init__(
        self,
        spec: QuantSpec,
        num_candidates: int = 100,
        hist_bins: int = 16384,
        max_samples_per_row: int = 65536,
        seed: int = 0,
    ) -> None:
        super().__init__(spec, hist_bins, max_samples_per_row, seed)
        if num_candidates < 1:
            raise ValueError(f"MSEObserver: num_candidates={num_candidates!r} must be >= 1")
        self.num_candidates = int(num_candidates)

    def _errors(self, values: Tensor, weights: Tensor | None, lo: Tensor, hi: Tensor) -> Tensor:
        """Squared error per row of fake-quantizing `values` (rows, n) on the grid of [lo, hi]."""
        spec = self.spec
        scale, zero_point = F.calc_qparams(
            lo, hi, spec.qmin, spec.qmax, spec.symmetric, pow2=spec.scale_type == "pow2"
        )
        err = (
            F.fake_quantize(values, scale, zero_point, spec.qmin, spec.qmax, axis=0) - values
        ).double()
        err = err.square()
        if weights is not None:
            err = err * weights
        return err.sum(dim=1)

    def _search(
        self, values: Tensor, weights: Tensor | None, mn: Tensor, mx: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Best (lo, hi) per row; values (rows, n), mn/mx (rows,) float32."""
        fractions = (
            torch.arange(1, self.num_candidates + 1, dtype=torch.float32) / self.num_candidates
        )
        # The full range (fraction 1) comes first among equals, so ties keep min/max.
        fractions = fractions.flip(0)
        best_lo, best_hi = mn.clone(), mx.clone()
        best_err = self._errors(values, weights, best_lo, best_hi)

        def consider(lo: Tensor, hi: Tensor) -> None:
            nonlocal best_err
            err = self._errors(values, weights, lo, hi)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo.copy_(torch.where(better, lo, best_lo))
            best_hi.copy_(torch.where(better, hi, best_hi))

        for a in fractions:
            consider(mn * a, mx * a)
        if not self.spec.symmetric:
            # The ends of an asymmetric grid clip different tails: refine each on its own.
            hi_fixed = best_hi.clone()
            for a in fractions:
                consider(mn * a, hi_fixed)
            lo_fixed = best_lo.clone()
            for a in fractions:
                consider(lo_fixed, mx * a)
        return best_lo, best_hi

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self._need_data()
        if self.axis is None:
            hist = self.hist
            values = hist.centers().float().unsqueeze(0)
            weights = hist.counts.unsqueeze(0)
            # Candidates scale the exact extremes, not the histogram's edges.
            mn = torch.tensor([hist.min_val], dtype=torch.float32)
            mx = torch.tensor([hist.max_val], dtype=torch.float32)
            lo, hi = self._search(values, weights, mn, mx)
            return lo.reshape(()), hi.reshape(())
        assert self.sample.rows is not None
        rows = self.sample.rows
        lo, hi = self._search(rows, None, rows.amin(dim=1), rows.amax(dim=1))
        return self._to_params(lo), self._to_params(hi)
