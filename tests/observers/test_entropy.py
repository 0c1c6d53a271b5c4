"""EntropyObserver (observers/entropy.py): the KL threshold against a literal reference loop,
clipping of outliers, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toys import gen, observe, per_channel, per_group, per_tensor  # tests/toys.py

from edgequant.observers import (
    OBSERVERS,
    EntropyObserver,
)
from edgequant.spec import QuantSpec


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
