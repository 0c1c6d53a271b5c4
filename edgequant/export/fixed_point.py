"""Fixed-point arithmetic of integer kernels (gemmlowp / TFLite): a real multiplier as a 31-bit
integer and a shift, and the two ways TFLite and CMSIS-NN apply it.

"single" (TFLITE_SINGLE_ROUNDING / CMSIS_NN_USE_SINGLE_ROUNDING): the 64-bit product rounded
once, ties up; "double" (their default builds): gemmlowp's SaturatingRoundingDoublingHighMul,
then RoundingDivideByPOT. Values are int32 held in int64 numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgequant.export.integer_graph import IntegerGraphError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_multiplier(real: Any) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's QuantizeMultiplier: real = multiplier * 2^(shift - 31), multiplier a 31-bit
    integer in [2^30, 2^31) (0 for real 0). Element-wise over an array of positive reals."""
    r = np.asarray(real, dtype=np.float64)
    if np.any(~np.isfinite(r)) or np.any(r < 0):
        raise IntegerGraphError(f"requantization multiplier must be finite and >= 0, got {r}")
    mantissa, shift = np.frexp(r)
    # std::round: half away from zero (mantissa > 0 here).
    q = np.floor(mantissa * 2.0**31 + 0.5).astype(np.int64)
    shift = shift.astype(np.int64)
    top = q == 2**31
    q = np.where(top, q // 2, q)
    shift = np.where(top, shift + 1, shift)
    tiny = shift < -31
    q = np.where(tiny | (r == 0), 0, q)
    shift = np.where(tiny | (r == 0), 0, shift)
    big = shift > 30
    q = np.where(big, 2**31 - 1, q)
    shift = np.where(big, 30, shift)
    return q, shift


def _trunc_div_pow2_31(t: np.ndarray) -> np.ndarray:
    """t / 2^31 truncated toward zero, as C++ integer division."""
    d = np.int64(2**31)
    return np.where(t >= 0, t // d, -((-t) // d))


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp's SaturatingRoundingDoublingHighMul on int32 values (held in int64)."""
    a = a.astype(np.int64)
    b = np.asarray(b, dtype=np.int64)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    high = _trunc_div_pow2_31(ab + nudge)
    return np.where(overflow, INT32_MAX, high)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp's RoundingDivideByPOT: x / 2^exponent, ties away from zero."""
    x = x.astype(np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> e) + (remainder > threshold).astype(np.int64)


ROUNDINGS = ("double", "single")


def multiply_by_quantized_multiplier(
    x: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, rounding: str = "double"
) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier: x * multiplier * 2^(shift - 31), rounded; x holds
    int32 values.

    rounding="double": gemmlowp's SaturatingRoundingDoublingHighMul (the 64-bit product
    rounded to its high 32 bits, ties up) then RoundingDivideByPOT (the right shift, ties away
    from zero): TFLite's reference kernels and CMSIS-NN as built by default. Two roundings: the
    first leaves a multiple of 2^-right_shift, so a value within 2^-(right_shift + 1) of a tie
    can round the wrong way (seen on ResNet-20: acc 10402 x 0.0030282 = 31.4998 -> 32).
    rounding="single": one rounding of the 64-bit product, ties toward +infinity: TFLite built
    with TFLITE_SINGLE_ROUNDING, CMSIS-NN with CMSIS_NN_USE_SINGLE_ROUNDING.
    In "double" the left shift saturates to int32 as a 32-bit port's does."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    shift = np.asarray(shift, dtype=np.int64)
    if rounding == "single":
        total = 31 - shift
        product = x.astype(np.int64) * np.asarray(multiplier, dtype=np.int64)
        return (product + (np.int64(1) << (total - 1))) >> total
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = np.clip(x.astype(np.int64) * (np.int64(1) << left), INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)
