"""Observers: each range estimator against a hand or numpy computation, on batches of any shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgequant import functional as F
from edgequant.observers import (
    OBSERVERS,
    AutoObserver,
    EMAObserver,
    EntropyObserver,
    Histogram,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
)
from edgequant.spec import QuantSpec


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_tensor(bits: int = 8, signed: bool = True, observer: str = "minmax") -> QuantSpec:
    return QuantSpec(bits=bits, signed=signed, symmetric=signed, observer=observer)


def per_channel(axis: int = 0, bits: int = 8, observer: str = "minmax") -> QuantSpec:
    return QuantSpec(bits=bits, granularity="channel", axis=axis, observer=observer)


def per_group(group_size: int, axis: int = 1, bits: int = 4, observer: str = "minmax") -> QuantSpec:
    return QuantSpec(
        bits=bits, granularity="group", axis=axis, group_size=group_size, observer=observer
    )


def observe(spec: QuantSpec, *batches: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, ...]:
    obs = OBSERVERS[spec.observer](spec, **kwargs)  # type: ignore[arg-type]
    for batch in batches:
        obs(batch)
    return obs.compute_range()


def quant_mse(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> float:
    """Mean squared error of fake-quantizing x on the grid the range gives."""
    scale, zero_point = F.calc_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    axis = None if spec.per_tensor else spec.axis
    fq = F.fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax, axis, spec.group_size)
    return float((fq - x).double().pow(2).mean())


def test_registry_holds_every_observer() -> None:
    expected = {
        "minmax": MinMaxObserver,
        "ema": EMAObserver,
        "percentile": PercentileObserver,
        "mse": MSEObserver,
        "entropy": EntropyObserver,
        "auto": AutoObserver,
    }
    assert expected == OBSERVERS


# --- minmax --------------------------------------------------------------------------------------


def test_minmax_is_exact_over_batches_of_different_shapes() -> None:
    a = torch.randn(2, 7, 16, generator=gen(0))
    b = torch.randn(3, 11, 16, generator=gen(1)) * 3
    lo, hi = observe(per_tensor(), a, b)
    both = torch.cat([a.reshape(-1), b.reshape(-1)])
    assert lo.shape == () and hi.shape == ()
    assert lo == both.min() and hi == both.max()
    lo, hi = observe(per_channel(axis=-1), a, b)
    rows = torch.cat([a.reshape(-1, 16), b.reshape(-1, 16)])
    assert torch.equal(lo, rows.amin(0)) and torch.equal(hi, rows.amax(0))


def test_minmax_per_group_is_exact() -> None:
    w = torch.randn(6, 32, generator=gen(2))
    lo, hi = observe(per_group(8), w)
    assert lo.shape == (6, 4)
    assert torch.equal(lo, w.reshape(6, 4, 8).amin(-1))
    assert torch.equal(hi, w.reshape(6, 4, 8).amax(-1))


# --- ema -----------------------------------------------------------------------------------------


def test_ema_matches_a_hand_computed_average() -> None:
    batches = [
        torch.tensor([-1.0, 2.0]),
        torch.tensor([[-3.0, 0.0], [1.0, 6.0]]),  # another shape
        torch.tensor([0.5, 1.0, 4.0]),
    ]
    lo, hi = observe(per_tensor(observer="ema"), *batches)
    # The first batch initialises; then range += 0.01 * (batch range - range).
    exp_lo, exp_hi = -1.0, 2.0
    for b_lo, b_hi in [(-3.0, 6.0), (0.5, 4.0)]:
        exp_lo += 0.01 * (b_lo - exp_lo)
        exp_hi += 0.01 * (b_hi - exp_hi)
    assert float(lo) == pytest.approx(exp_lo, rel=1e-6)
    assert float(hi) == pytest.approx(exp_hi, rel=1e-6)
    # by hand: -1 + 0.01 * (-3 + 1) = -1.02, then -1.02 + 0.01 * (0.5 + 1.02) = -1.0048
    assert (exp_lo, exp_hi) == pytest.approx((-1.0048, 2.0596), abs=1e-12)


def test_ema_momentum_and_per_channel() -> None:
    a = torch.tensor([[0.0, 4.0], [-2.0, 2.0]])  # channel 0 range [0, 4], channel 1 [-2, 2]
    b = torch.tensor([[-4.0, 8.0, 1.0], [0.0, 1.0, 0.5]])  # channel 0 [-4, 8], channel 1 [0, 1]
    obs = EMAObserver(per_channel(axis=0, observer="ema"), momentum=0.5)
    obs(a)
    obs(b)
    lo, hi = obs.compute_range()
    assert torch.equal(lo, torch.tensor([-2.0, -1.0]))
    assert torch.equal(hi, torch.tensor([6.0, 1.5]))
    with pytest.raises(ValueError, match="momentum"):
        EMAObserver(per_tensor(observer="ema"), momentum=0.0)


# --- percentile ----------------------------------------------------------------------------------


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


# --- mse -----------------------------------------------------------------------------------------


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


# --- entropy -------------------------------------------------------------------------------------


def test_entropy_clips_an_outlier() -> None:
    x = torch.randn(100_000, generator=gen(8))
    x[123] = 60.0
    lo, hi = observe(per_tensor(observer="entropy"), x[:40_000].reshape(40, 1000), x[40_000:])
    assert 3.0 < float(hi) < 10.0  # far below the outlier at 60
    assert float(lo) == pytest.approx(-float(hi))
    # unsigned 8 bits on ReLU output: 256 levels, also below the outlier
    r = torch.relu(x)
    lo, hi = observe(per_tensor(signed=False, observer="entropy"), r)
    assert float(lo) == 0.0 and 2.0 < float(hi) < 10.0


def test_entropy_matches_a_literal_reference_loop() -> None:
    """The vectorised loop against the slides' pseudo-code, written plainly, on one histogram."""
    rng = np.random.default_rng(9)
    hist = np.histogram(np.abs(rng.laplace(size=20_000)), bins=256)[0].astype(np.float64)
    hist[-1] += 3  # a few outliers at the top
    levels = 16
    obs = EntropyObserver(per_tensor(bits=5, observer="entropy"), num_bins=256)
    assert obs.levels == levels
    ours = obs._divergences(hist)
    expected = []
    for i in range(levels, 257):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        merged = i // levels
        q = np.zeros(i)
        for j in range(levels):
            start, stop = j * merged, (i if j == levels - 1 else (j + 1) * merged)
            nonzero = p[start:stop] != 0
            if nonzero.any():
                q[start:stop][nonzero] = hist[start:stop].sum() / nonzero.sum()
        q[(p != 0) & (q == 0)] = 1e-4
        keep = p != 0
        pp, qq = p[keep] / p.sum(), q[keep] / q.sum()
        expected.append(np.sum(pp * np.log(pp / qq)))
    np.testing.assert_allclose(ours, expected, rtol=1e-9)


def test_entropy_is_per_tensor_only() -> None:
    with pytest.raises(ValueError, match="'channel'"):
        EntropyObserver(per_channel(observer="entropy"))
    with pytest.raises(ValueError, match="'group'"):
        EntropyObserver(per_group(8, observer="entropy"))


def test_entropy_of_a_constant_keeps_its_value() -> None:
    lo, hi = observe(per_tensor(observer="entropy"), torch.full((3, 5), 2.5))
    assert float(lo) == 2.5 and float(hi) == 2.5


# --- shared behaviour ----------------------------------------------------------------------------


HIST_OBSERVERS = ["percentile", "mse", "entropy"]


@pytest.mark.parametrize("name", HIST_OBSERVERS)
def test_variable_shape_batches_merge(name: str) -> None:
    g = gen(10)
    a = torch.randn(2, 7, 16, generator=g)
    b = torch.randn(3, 11, 16, generator=g) * 4  # a wider range: the histogram must grow
    lo, hi = observe(per_tensor(observer=name), a, b)
    # the same data in one flat batch (histograms laid out differently, so close, not equal)
    lo1, hi1 = observe(per_tensor(observer=name), torch.cat([a.reshape(-1), b.reshape(-1)]))
    both = torch.cat([a.reshape(-1), b.reshape(-1)])
    assert float(both.min()) <= float(lo) <= float(hi) <= float(both.max())
    assert float(lo) == pytest.approx(float(lo1), abs=0.1 * float(both.abs().max()))
    assert float(hi) == pytest.approx(float(hi1), abs=0.1 * float(both.abs().max()))


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse"])
def test_per_channel_variable_shapes_merge(name: str) -> None:
    g = gen(11)
    a, b = torch.randn(2, 7, 16, generator=g), torch.randn(3, 11, 16, generator=g)
    lo, hi = observe(per_channel(axis=-1, observer=name), a, b)
    assert lo.shape == hi.shape == (16,)
    assert bool((lo < 0).all()) and bool((hi > 0).all())
    with pytest.raises(ValueError, match="does not match"):
        observe(per_channel(axis=-1, observer=name), a, torch.randn(2, 7, 8))


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse"])
@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((8, 3, 3, 3), per_channel(axis=0)),
        ((4, 6, 5), per_channel(axis=1)),
        ((4, 6, 5), per_channel(axis=-1)),
        ((12, 64), per_group(16, axis=1)),
        ((2, 64, 3), per_group(8, axis=1)),
    ],
)
def test_per_channel_and_group_shapes(name: str, shape: tuple[int, ...], spec: QuantSpec) -> None:
    x = torch.randn(shape, generator=gen(12))
    spec = spec.replace(observer=name)
    lo, hi = observe(spec, x)
    expected = F.param_shape(x.shape, spec.axis, spec.group_size)
    assert lo.shape == hi.shape == expected
    assert lo.dtype == hi.dtype == torch.float32
    mm_lo, mm_hi = F.reduce_min_max(x, spec.axis, spec.group_size)
    assert bool((mm_lo <= lo).all()) and bool((hi <= mm_hi).all())


@pytest.mark.parametrize("name", list(OBSERVERS))
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4, 5, 6)])
def test_any_rank_per_tensor(name: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=gen(13))
    lo, hi = observe(per_tensor(observer=name), x)
    assert lo.shape == hi.shape == ()
    assert float(x.min()) <= float(lo) <= float(hi) <= float(x.max())


@pytest.mark.parametrize("name", list(OBSERVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_raises(name: str, bad: float) -> None:
    x = torch.randn(4, 5)
    x[1, 2] = bad
    obs = OBSERVERS[name](per_tensor(observer=name))
    obs(torch.randn(3))
    with pytest.raises(ValueError, match="NaN/Inf"):
        obs(x)
    if name != "entropy":
        chan = OBSERVERS[name](per_channel(axis=1, observer=name))
        with pytest.raises(ValueError, match="NaN/Inf"):
            chan(x)


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_range_before_data_raises(name: str) -> None:
    with pytest.raises(RuntimeError, match="before any data"):
        OBSERVERS[name](per_tensor(observer=name)).compute_range()


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_deterministic(name: str) -> None:
    batches = [torch.randn(3, n, 8, generator=gen(n)) * n for n in (5, 9, 2)]
    first = observe(per_tensor(observer=name), *batches)
    second = observe(per_tensor(observer=name), *batches)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_histogram_regrowth_is_exact() -> None:
    """Growing by doubling merges bins pairwise: the counts equal a histogram of all the data on
    the final range (integers on dyadic edges, so no value sits on a rounding boundary)."""
    hist = Histogram(16)
    batches = [
        torch.arange(0, 16, dtype=torch.float32),  # 15 * 16/15: range [0, 16)
        torch.tensor([40.0, 3.0, 16.0, 32.0]),  # grows up twice: [0, 64)
        torch.tensor([-50.0, 60.0, 0.0]),  # grows down once: [-64, 64]
    ]
    for b in batches:
        hist.add(b)
    assert (hist.lo, hist.width) == (-64.0, 128.0)
    data = torch.cat(batches).numpy()
    ref = np.histogram(data, bins=16, range=(-64, 64))[0]
    np.testing.assert_array_equal(hist.counts.numpy(), ref)
    assert hist.total == data.size and (hist.min_val, hist.max_val) == (-50.0, 60.0)
    assert hist.quantile(0.0) == -50.0 and hist.quantile(1.0) == 60.0


def test_entropy_is_not_pulled_to_zero_by_relu_zeros() -> None:
    # Half of a ReLU's outputs are exact zeros; they are on every grid and must not drag the
    # KL threshold down (they did: ResNet-20 W8A8 fell to 88 % held-out accuracy).
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(200_000, generator=g))
    spec = QuantSpec(
        bits=8, signed=False, symmetric=False, granularity="tensor", observer="entropy"
    )
    obs = OBSERVERS["entropy"](spec)
    obs(x)
    lo, hi = obs.compute_range()
    assert float(lo) == 0.0
    assert float(hi) >= float(torch.quantile(x[x > 0][:100_000], 0.999))
    only_zeros = OBSERVERS["entropy"](spec)
    only_zeros(torch.zeros(10))
    lo, hi = only_zeros.compute_range()
    assert float(lo) == 0.0 and float(hi) == 0.0


def test_the_registry_implements_exactly_the_names_a_spec_accepts() -> None:
    from edgequant.observers import OBSERVERS
    from edgequant.spec import OBSERVER_NAMES

    assert tuple(OBSERVERS) == OBSERVER_NAMES
