"""Range estimators: watch tensors during calibration, then say which range to quantize.

Each observer is an nn.Module with `forward(x)` (records statistics, returns nothing useful) and
`compute_range()` -> (min_val, max_val) shaped as `functional.param_shape` for its spec's
granularity. They are looked up by name in OBSERVERS.

Statistics that must survive many batches of different shapes (variable sequence length) are kept
in shape-free forms: per-tensor histograms that grow by doubling their range (so old bins merge
exactly, pairwise), and per-channel/per-group bounded samples of each row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import numpy as np
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


class MinMaxObserver(Observer):
    """The running min and max of everything seen."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        x = self._check_batch(x)
        mn, mx = F.reduce_min_max(x, self.axis, self.group_size)
        if self.batches == 0:
            self.min_val, self.max_val = mn, mx
        else:
            self.min_val, self.max_val = (
                torch.minimum(self.min_val, mn),
                torch.maximum(self.max_val, mx),
            )
        self.batches += 1

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self._need_data()
        return self.min_val.clone(), self.max_val.clone()


class EMAObserver(Observer):
    """Exponential moving average of each batch's min and max (the first batch initialises):
    range <- range + momentum * (batch range - range)."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.01) -> None:
        super().__init__(spec)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"EMAObserver: momentum={momentum!r} must be in (0, 1]")
        self.momentum = float(momentum)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        x = self._check_batch(x)
        mn, mx = F.reduce_min_max(x, self.axis, self.group_size)
        if self.batches == 0:
            self.min_val, self.max_val = mn, mx
        else:
            self.min_val = self.min_val + self.momentum * (mn - self.min_val)
            self.max_val = self.max_val + self.momentum * (mx - self.max_val)
        self.batches += 1

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self._need_data()
        return self.min_val.clone(), self.max_val.clone()


class _Histogram:
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


class _RowSample:
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


def _rows_to_params(
    values: Tensor, shape: tuple[int, ...], axis: int, group_size: int | None
) -> Tensor:
    """Per-row values (one per row of `functional.to_rows`) laid out as `functional.param_shape`."""
    pshape = F.param_shape(shape, axis, group_size)
    if group_size is None:
        return values.reshape(pshape)
    moved = tuple(s for i, s in enumerate(pshape) if i != axis) + (pshape[axis],)
    return values.reshape(moved).movedim(-1, axis)


def _row_quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row quantile with linear interpolation (numpy's default), with no size limit."""
    ordered = torch.sort(rows.double(), dim=1).values
    pos = q * (rows.shape[1] - 1)
    below = math.floor(pos)
    above = min(below + 1, rows.shape[1] - 1)
    frac = pos - below
    return ordered[:, below] + frac * (ordered[:, above] - ordered[:, below])


class _SampledObserver(Observer):
    """Shared plumbing: per-tensor statistics in a histogram, per-channel/group in row samples."""

    def __init__(
        self, spec: QuantSpec, hist_bins: int, max_samples_per_row: int, seed: int
    ) -> None:
        super().__init__(spec)
        self.hist = _Histogram(hist_bins)
        self.sample = _RowSample(max_samples_per_row, seed)

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
        return _rows_to_params(values.float(), self._first_shape, axis, self.group_size)


class PercentileObserver(_SampledObserver):
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
        return self._to_params(_row_quantile(rows, 1.0 - q)), self._to_params(
            _row_quantile(rows, q)
        )


class MSEObserver(_SampledObserver):
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
        self.abs_hist = _Histogram(hist_bins, from_zero=True)
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


class AutoObserver(Observer):
    """Per layer "auto": feeds every candidate observer and, at compute_range, picks the candidate
    range whose quantization causes the least error.

    The error is measured on a bounded sample of the observed tensor (its first `sample_items`
    items along dim 0). By default it is the tensor's own squared quantization error; calibration
    code that knows which layers read the tensor sets `score_fn(sample, fake_quantized_sample)`
    to measure the error in those layers' outputs instead (ptq.auto). `chosen` names the pick.
    """

    CANDIDATES: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")

    def __init__(self, spec: QuantSpec, sample_items: int = 32) -> None:
        super().__init__(spec)
        names = [c for c in self.CANDIDATES if spec.per_tensor or c != "entropy"]
        self.candidates = nn.ModuleDict({c: OBSERVERS[c](spec) for c in names})
        self.sample_items = int(sample_items)
        self.samples: list[Tensor] = []
        self._kept = 0
        self.score_fn: Callable[[Tensor, Tensor], float] | None = None
        self.chosen: str | None = None
        self.errors: dict[str, float] = {}

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        x = self._check_batch(x)
        for obs in self.candidates.values():
            obs(x)
        if self._kept < self.sample_items and x.dim() > 0:
            part = x[: self.sample_items - self._kept].clone()
            self.samples.append(part)
            self._kept += part.shape[0]
        self.batches += 1

    def _fake_quantize(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        spec = self.spec
        scale, zp = F.calc_qparams(
            lo, hi, spec.qmin, spec.qmax, spec.symmetric, pow2=spec.scale_type == "pow2"
        )
        return F.fake_quantize(x, scale, zp, spec.qmin, spec.qmax, self.axis, self.group_size)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self._need_data()
        best: tuple[float, str, Tensor, Tensor] | None = None
        self.errors = {}
        for name, obs in self.candidates.items():
            lo, hi = cast(Observer, obs).compute_range()
            errs = []
            for x in self.samples:
                xq = self._fake_quantize(x, lo, hi)
                if self.score_fn is not None:
                    errs.append(float(self.score_fn(x, xq)))
                else:
                    errs.append(float((xq - x).double().square().mean()))
            err = sum(errs) / max(len(errs), 1)
            self.errors[name] = err
            if best is None or err < best[0]:
                best = (err, name, lo, hi)
        assert best is not None
        self.chosen = best[1]
        return best[2], best[3]


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
    "auto": AutoObserver,
}
