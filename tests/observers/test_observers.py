"""What every observer of the registry (observers/__init__.py) shares: batches of any shape and
rank, refusal of NaN/Inf, determinism; and AutoObserver's choice. Each observer's own estimate is
tested beside its module (test_base, test_sampled, test_entropy, test_stats)."""

from __future__ import annotations

import pytest
import torch
from toys import gen, observe, per_channel, per_group, per_tensor  # tests/toys.py

from edgequant import functional as F
from edgequant.observers import (
    OBSERVERS,
    AutoObserver,
    EMAObserver,
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
)
from edgequant.spec import OBSERVER_NAMES, QuantSpec, activation_spec


@pytest.mark.parametrize(
    "cls",
    [MinMaxObserver, EMAObserver, PercentileObserver, MSEObserver, EntropyObserver, AutoObserver],
)
def test_registry_holds_every_observer_under_its_name(cls: type) -> None:
    # Each name of the spec is the class's name without "Observer", lower case.
    name = cls.__name__.removesuffix("Observer").lower()
    assert name in OBSERVER_NAMES
    assert OBSERVERS[name] is cls


def test_registry_holds_the_spec_names_only() -> None:
    assert list(OBSERVERS) == list(OBSERVER_NAMES)


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


def test_the_registry_implements_exactly_the_names_a_spec_accepts() -> None:
    assert tuple(OBSERVERS) == OBSERVER_NAMES


def test_auto_observer_picks_the_lowest_error_candidate() -> None:
    spec = activation_spec(4, "auto")
    obs = AutoObserver(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[0, 0] = 40.0  # one outlier: minmax wastes the grid on it
    obs(x)
    lo, hi = obs.compute_range()
    assert obs.chosen != "minmax"
    assert obs.errors[obs.chosen] == min(obs.errors.values())
    # A scorer that only cares about the outlier makes minmax (which keeps it) the best.
    obs.score_fn = lambda s, sq: float((s[0, 0] - sq[0, 0]).abs())
    obs.compute_range()
    assert obs.chosen == "minmax"
