"""The entropy (KL divergence) observer: TensorRT's calibration on a histogram of |x|."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from edgequant.spec import QuantSpec
from edgequant.observers.base import Observer
from edgequant.observers.stats import Histogram


class EntropyObserver(Observer):
    """KL-divergence calibration as TensorRT does it (Migacz 2017, "8-bit Inference with TensorRT",
    the calibration slides): a `num_bins` histogram of |x|; for each threshold i in
    [levels, num_bins] the reference P is bins [0, i) with the outliers added to its last bin, the
    candidate Q is the same bins merged into `levels` levels and expanded back over P's non-zero
    bins; pick the i minimising KL(P || Q). levels = 2^(bits-1) for signed grids, 2^bits for
    unsigned. Per tensor only. With levels >= num_bins (13+ bits signed) nothing is clipped.

    |x| is first counted in a finer histogram that merges batches exactly (`hist_bins`); the
    `num_bins` histogram over [0, max|x|] is read off its cumulative counts.
    """

    # Added to Q's empty bins where P is not empty, in units of one count, as in the reference
    # implementations (MXNet, ONNX Runtime), so a threshold is penalised, not ruled out.
    SMOOTHING = 1e-4

    def __init__(self, spec: QuantSpec, num_bins: int = 2048, hist_bins: int = 16384) -> None:
        super().__init__(spec)
        if not spec.per_tensor:
            raise ValueError(
                f"EntropyObserver supports granularity 'tensor' only, got granularity "
                f"{spec.granularity!r}; use 'mse' or 'percentile' per channel or group"
            )
        if num_bins < 2:
            raise ValueError(f"EntropyObserver: num_bins={num_bins!r} must be >= 2")
        if hist_bins < num_bins:
            raise ValueError(
                f"EntropyObserver: hist_bins={hist_bins!r} must be >= num_bins={num_bins}"
            )
        self.num_bins = int(num_bins)
        self.levels = 2 ** (spec.bits - 1) if spec.signed else 2**spec.bits
        self.abs_hist = Histogram(hist_bins, from_zero=True)
        self.min_val = math.inf
        self.max_val = -math.inf

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        x = self._check_batch(x)
        # Exact zeros (half of a ReLU's output) land on the grid at any threshold: they carry no
        # quantization error, and their spike in bin 0 would pull the KL search to tiny ranges.
        nonzero = x[x != 0].abs()
        if nonzero.numel():
            self.abs_hist.add(nonzero)
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))
        self.batches += 1

    def _abs_histogram(self) -> tuple[np.ndarray, float]:
        """`num_bins` counts of |x| over [0, max|x|] and the bin width."""
        hist = self.abs_hist
        amax = hist.max_val
        cdf = np.concatenate([[0.0], np.cumsum(hist.counts.numpy())])
        edges = np.linspace(0.0, amax, self.num_bins + 1)
        # Linear inside the fine bins; the fine bins are at least hist_bins / 2 / num_bins times
        # narrower than these, so little is smeared.
        counts = np.diff(np.interp(edges, hist.edges().numpy(), cdf))
        counts[-1] += cdf[-1] - counts.sum()
        return np.maximum(counts, 0.0), amax / self.num_bins

    def _divergences(self, hist: np.ndarray) -> np.ndarray:
        """KL(P || Q) for every number of kept bins i in [levels, num_bins] (index i - levels)."""
        levels, num_bins = self.levels, self.num_bins
        # outliers[i] = sum(hist[i:])
        outliers = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
        eps = self.SMOOTHING
        divergence = np.empty(num_bins - levels + 1)
        starts = np.arange(levels)
        for i in range(levels, num_bins + 1):
            sliced = hist[:i]
            if not sliced.any():
                # Q would be empty: no distribution to compare (the references skip it too).
                divergence[i - levels] = np.inf
                continue
            p = sliced.copy()
            p[-1] += outliers[i]
            nonzero = p != 0
            merged = i // levels
            lengths = np.full(levels, merged)
            lengths[-1] = i - merged * (levels - 1)
            q_levels = np.add.reduceat(sliced, starts * merged)
            norms = np.add.reduceat(nonzero.astype(np.float64), starts * merged)
            per_bin = np.divide(q_levels, norms, out=np.zeros(levels), where=norms > 0)
            q = np.where(nonzero, np.repeat(per_bin, lengths), 0.0)
            q = np.where(nonzero & (q == 0), eps, q)
            p_prob = p[nonzero] / p.sum()
            q_prob = q[nonzero] / q.sum()
            divergence[i - levels] = float(np.sum(p_prob * np.log(p_prob / q_prob)))
        return divergence

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self._need_data()
        threshold = max(self.abs_hist.max_val, 0.0)  # all zeros: nothing was histogrammed
        if self.levels < self.num_bins and threshold > 0:
            hist, bin_width = self._abs_histogram()
            divergence = self._divergences(hist)
            best = int(np.argmin(divergence)) + self.levels
            # Migacz's slides place the threshold half a bin above the kept bins.
            threshold = min((best + 0.5) * bin_width, threshold)
        hi = min(self.max_val, threshold)
        # [-threshold, threshold] may miss the data entirely (all far from zero): keep lo <= hi.
        lo = min(max(self.min_val, -threshold), hi)
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
