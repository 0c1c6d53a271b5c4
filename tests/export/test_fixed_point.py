"""The integer runner's fixed-point arithmetic (export/fixed_point.py): multipliers as TFLite makes
them, and requantization with gemmlowp's double rounding and a single rounding, against exact
integers."""

from __future__ import annotations

import numpy as np
import pytest

from edgequant.export.fixed_point import multiply_by_quantized_multiplier, quantize_multiplier


def test_quantize_multiplier_matches_tflite() -> None:
    mult, shift = quantize_multiplier(np.array([0.5, 1.0, 0.75, 0.0, 2.0**-40]))
    assert mult.tolist() == [2**30, 2**30, 3 * 2**29, 0, 0]
    assert shift.tolist() == [0, 1, 0, 0, 0]


def _round_half_away(num: int, den: int) -> int:
    q, r = divmod(abs(num), den)
    return (q + (2 * r >= den)) * (1 if num >= 0 else -1)


@pytest.mark.parametrize("real", [0.3, 0.0123, 1.7, 2.0**-9])
def test_multiply_by_quantized_multiplier_in_exact_integers(real: float) -> None:
    """Against Python's unbounded integers: "double" is gemmlowp's two roundings (the high
    32 bits of the doubled product, ties up; then the shift, ties away from zero); "single"
    is one rounding of the exact product, ties up."""
    rng = np.random.default_rng(0)
    x = rng.integers(-(2**20), 2**20, size=400)
    mult, shift = (int(v) for v in quantize_multiplier(real))
    left, right = max(shift, 0), max(-shift, 0)
    double = multiply_by_quantized_multiplier(x, mult, shift, "double")
    single = multiply_by_quantized_multiplier(x, mult, shift, "single")
    for xi, d, s in zip(x.tolist(), double.tolist(), single.tolist(), strict=True):
        high = (xi * 2**left * mult + 2**30) // 2**31  # gemmlowp's nudge: ties toward +inf
        assert d == _round_half_away(high, 2**right)
        num, den = xi * mult, 2 ** (31 - shift)
        assert s == (num + den // 2) // den  # floor(v + 1/2): ties toward +infinity
        assert abs(s - xi * real) <= 0.5 + 1e-6 * abs(xi * real)
        assert abs(d - xi * real) <= 0.5 + 2.0**-right * 0.5 + 1e-6 * abs(xi * real)
    with pytest.raises(ValueError, match="rounding must be one of"):
        multiply_by_quantized_multiplier(x, mult, shift, "nearest")


def test_ties_are_where_integer_and_onnx_runtime_requantization_differ() -> None:
    """The documented difference: x * 0.25 for x = 2, 6, -2, -6 is 0.5, 1.5, -0.5, -1.5;
    ONNX Runtime rounds half to even, gemmlowp away from zero, single rounding up."""
    mult, shift = quantize_multiplier(0.25)
    x = np.array([2, 6, -2, -6])
    assert multiply_by_quantized_multiplier(x, mult, shift, "double").tolist() == [1, 2, -1, -2]
    assert multiply_by_quantized_multiplier(x, mult, shift, "single").tolist() == [1, 2, 0, -1]
    assert np.rint(x * 0.25).tolist() == [0, 2, -0, -2]  # half to even (ORT's requantization)
