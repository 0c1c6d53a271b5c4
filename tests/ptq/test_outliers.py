"""The rule of ptq/outliers.py that turns smoothing and splitting on: an outlier is a few channels
far above the median of the live ones, not an even spread. What the two steps do is tested in
test_smoothquant.py and test_outlier_split.py."""

from __future__ import annotations

import pytest
import torch

from edgequant.ptq import outliers

OUTLIER = 3  # the channel with the planted outlier


def test_outlier_ratio_ignores_dead_channels() -> None:
    assert outliers.outlier_ratio(torch.tensor([1.0, 2.0, 1.0, 50.0, 1.0])) == pytest.approx(50.0)
    # Most channels dead (a ReLU network's): the median is over the live ones.
    assert outliers.outlier_ratio(torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0, 1.0])) == 2.0
    assert outliers.outlier_ratio(torch.zeros(4)) == 1.0


def test_outliers_are_a_few_channels_not_an_even_spread() -> None:
    few = torch.ones(64)
    few[OUTLIER] = 50.0
    assert outliers.has_outliers(few)
    # Ranges spread evenly over two decades (unequal CNN channels): a quarter of the channels
    # sit above the bar, which is no outlier for splitting or smoothing to fix.
    spread = torch.logspace(-1, 1, 32)
    assert outliers.outlier_ratio(spread) > outliers.OUTLIER_RATIO
    assert not outliers.has_outliers(spread)
