"""The running-range observers of observers/base.py: MinMaxObserver is exact, EMAObserver matches
a hand-computed moving average."""

from __future__ import annotations

import pytest
import torch
from toys import gen, observe, per_channel, per_group, per_tensor  # tests/toys.py

from edgequant.observers import (
    EMAObserver,
)


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
