"""export/integer_values.py: what the integer runner holds (integers with their grid) and its
integer arithmetic helpers: TFLite's rounding, the integer conv, requantization to a grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgequant.export.fixed_point import multiply_by_quantized_multiplier
from edgequant.export.integer_graph import IntegerGraphError
from edgequant.export.integer_values import (
    Quantized,
    conv2d,
    dequantize,
    requantize,
    tflite_round,
)


def _q(values: list[int], scale: float, zp: int) -> Quantized:
    return Quantized(np.array(values, np.int64), np.float32([scale]), np.int64([zp]), None, np.int8)


def test_tflite_round_takes_halves_away_from_zero() -> None:
    assert [tflite_round(v) for v in (0.5, 1.5, 2.5, -0.5, -2.5, 0.49)] == [1, 2, 3, -1, -3, 0]


@pytest.mark.parametrize(
    ("strides", "pads", "group"), [([1, 1], [0, 0, 0, 0], 1), ([2, 1], [1, 0, 1, 2], 2)]
)
def test_integer_conv_is_torchs_conv_on_integers(
    strides: list[int], pads: list[int], group: int
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (2, 4, 7, 6), generator=g)
    w = torch.randint(-127, 128, (6, 4 // group, 3, 2), generator=g)
    padded = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    expected = F.conv2d(padded.double(), w.double(), stride=strides, groups=group).long()
    got = conv2d(x.numpy(), w.numpy(), strides, [1, 1], pads, group, np.dot)
    assert np.array_equal(got, expected.numpy())


def test_requantize_keeps_integers_on_the_same_grid_and_rescales_on_another() -> None:
    x = _q([-100, 0, 50, 127], 0.5, 0)

    def unused(*args: object) -> np.ndarray:
        raise AssertionError("rescaled on the same grid")

    assert requantize(x, 0.5, 0, -100, 100, unused).tolist() == [-100, 0, 50, 100]
    # Half the scale: each value halved (TFLite rounds half away from zero), moved to zero point 3.
    halved = requantize(x, 1.0, 3, -128, 127, multiply_by_quantized_multiplier)
    assert halved.tolist() == [-47, 3, 28, 67]
    assert dequantize(x).tolist() == [-50.0, 0.0, 25.0, 63.5]
    per_channel = Quantized(x.q, np.float32([0.5, 1.0]), np.int64([0, 0]), 0, np.int8)
    with pytest.raises(IntegerGraphError, match="quantized per tensor"):
        dequantize(per_channel)
