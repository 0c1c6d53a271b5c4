"""The observers of observers/sampled.py: PercentileObserver against numpy, MSEObserver against
min/max and a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toys import gen, observe, per_channel, per_group, per_tensor, quant_mse  # tests/toys.py

from edgequant import functional as F
from edgequant.observers import (
    PercentileObserver,
)
from edgequant.spec import QuantSpec


def test_percentile_matches_numpy_over_growing_ranges_and_shapes() -> None:
    g = gen(3)
    # The first batch is narrow, so later ones force the histogram to re-bin (grow) twice.
    batches = [
        torch.randn(2, 7, 16, generator=g) * 0.1,
        torch.randn(40, 100, 64, generator=g),
        torch.randn(3, 11, 16, generator=g) * 2 + 1,
        torch.randn(50, 53, 64, generator=g),
    ]
    data = np.concatenate([b.numpy().reshape(-1) for b in batches]).astype(np.float64)
    for percentile in (99.99, 99.0):
        lo, hi = observe(per_tensor(observer="percentile"), *batches, percentile=percentile)
        ref_lo, ref_hi = np.percentile(data, [100 - percentile, percentile])
        # within a few bins and a few gaps between the sparse order statistics of the tail
        assert float(lo) == pytest.approx(ref_lo, abs=0.02)
        assert float(hi) == pytest.approx(ref_hi, abs=0.02)
    # and it does clip: the 99.99th percentile of ~550k normal values is far inside the extremes
    lo, hi = observe(per_tensor(observer="percentile"), *batches)
    assert data.min() + 0.2 < float(lo) and float(hi) < data.max() - 0.2


def test_percentile_per_channel_is_exact_numpy() -> None:
    x = torch.distributions.Laplace(0.0, 1.0).sample((8, 5, 300))
    lo, hi = observe(per_channel(axis=1, observer="percentile"), x[:3], x[3:], percentile=99.0)
    rows = x.movedim(1, 0).reshape(5, -1).double().numpy()
    ref_lo = np.percentile(rows, 1.0, axis=1)
    ref_hi = np.percentile(rows, 99.0, axis=1)
    assert lo.shape == hi.shape == (5,)
    np.testing.assert_allclose(lo.numpy(), ref_lo, rtol=1e-6)
    np.testing.assert_allclose(hi.numpy(), ref_hi, rtol=1e-6)


def test_percentile_per_channel_sample_is_bounded_and_deterministic() -> None:
    g = gen(4)
    batches = [torch.randn(4, n, 3, generator=g) for n in (500, 700, 900)]
    spec = per_channel(axis=-1, observer="percentile")
    obs = PercentileObserver(spec, percentile=99.0, max_samples_per_row=1000)
    for b in batches:
        obs(b)
    assert obs.sample.rows is not None and obs.sample.rows.shape == (3, 1000)
    lo, hi = obs.compute_range()
    again = observe(spec, *batches, percentile=99.0, max_samples_per_row=1000)
    assert torch.equal(lo, again[0]) and torch.equal(hi, again[1])
    # a 1000-element sample of N(0, 1) per channel: the 1st/99th percentiles near -/+2.33
    assert torch.allclose(hi, torch.full((3,), 2.326), atol=0.35)
    assert torch.allclose(lo, torch.full((3,), -2.326), atol=0.35)


def test_percentile_rejects_a_bad_percentile() -> None:
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(per_tensor(observer="percentile"), percentile=40.0)


@pytest.mark.parametrize("dist", ["laplace", "student-t"])
@pytest.mark.parametrize("signed", [True, False])
def test_mse_beats_minmax_on_heavy_tails_at_4_bits(dist: str, signed: bool) -> None:
    torch.manual_seed(5)
    if dist == "laplace":
        x = torch.distributions.Laplace(0.0, 1.0).sample((64, 1000))
    else:
        x = torch.distributions.StudentT(3.0).sample((64, 1000))
    if not signed:
        x = x.abs()  # e.g. after a ReLU-like op: an unsigned asymmetric grid
    spec = per_tensor(bits=4, signed=signed, observer="mse")
    # observed in batches of two shapes, error measured on all of it
    lo, hi = observe(spec, x[:20], x[20:].reshape(4, 11, 1000))
    mm_lo, mm_hi = observe(spec.replace(observer="minmax"), x)
    mse, minmax_mse = quant_mse(x, spec, lo, hi), quant_mse(x, spec, mm_lo, mm_hi)
    assert mse <= minmax_mse
    assert mse < 0.7 * minmax_mse  # heavy tails: clipping pays off well
    assert float(hi) < 0.6 * float(x.max())  # the outliers are clipped
    if signed:
        assert float(lo) > 0.6 * float(x.min())


@pytest.mark.parametrize("spec", [per_channel(axis=0, bits=4), per_group(32, axis=1, bits=4)])
def test_mse_per_channel_and_group_on_a_weight(spec: QuantSpec) -> None:
    torch.manual_seed(6)
    w = torch.distributions.StudentT(3.0).sample((16, 128))
    spec = spec.replace(observer="mse")
    lo, hi = observe(spec, w)
    mm_lo, mm_hi = observe(spec.replace(observer="minmax"), w)
    assert lo.shape == hi.shape == F.param_shape(w.shape, spec.axis, spec.group_size)
    assert quant_mse(w, spec, lo, hi) < 0.9 * quant_mse(w, spec, mm_lo, mm_hi)
    # per row, never worse than minmax on the row's own elements
    rows = F.to_rows(w, spec.axis, spec.group_size)
    s, z = F.calc_qparams(lo, hi, spec.qmin, spec.qmax, True)
    ms, mz = F.calc_qparams(mm_lo, mm_hi, spec.qmin, spec.qmax, True)

    def row_err(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        fq = F.fake_quantize(w, scale, zp, spec.qmin, spec.qmax, spec.axis, spec.group_size)
        return (F.to_rows(fq, spec.axis, spec.group_size) - rows).pow(2).sum(1)

    assert bool((row_err(s, z) <= row_err(ms, mz)).all())
    assert bool((hi <= mm_hi).all()) and bool((hi < mm_hi).any())


def test_mse_asymmetric_per_channel_refines_each_end() -> None:
    torch.manual_seed(7)
    # every channel: a short uniform left tail, a long exponential right one
    x = torch.cat([-torch.rand(4, 200), torch.distributions.Exponential(1.0).sample((4, 800))], 1)
    spec = QuantSpec(
        bits=4, signed=False, symmetric=False, granularity="channel", axis=0, observer="mse"
    )
    lo, hi = observe(spec, x)
    mm_lo, mm_hi = observe(spec.replace(observer="minmax"), x)

    def row_err(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale, zp = F.calc_qparams(lo, hi, spec.qmin, spec.qmax, False)
        return (F.fake_quantize(x, scale, zp, spec.qmin, spec.qmax, 0) - x).pow(2).mean(1)

    # brute force over one shared fraction of both ends, as a symmetric search would do
    joint = torch.stack([row_err(mm_lo * a, mm_hi * a) for a in torch.arange(1, 101) / 100])
    ours = row_err(lo, hi)
    assert bool((ours <= joint.min(0).values).all())
    assert bool((ours < joint.min(0).values).any())  # refining each end on its own pays
    assert not torch.allclose(lo / mm_lo, hi / mm_hi)  # the two ends are cut differently
