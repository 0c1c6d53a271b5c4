"""export/weight_trace.py: how each weight layer of an ONNX file is read (its source, dtype and
bits) and which 8-bit kernel ONNX Runtime runs it with."""

from __future__ import annotations

import pytest
from onnx import TensorProto

from edgequant.export.weight_trace import LayerInfo, dtype_bits, dtype_name


@pytest.mark.parametrize(
    ("activation_dtype", "weight_dtype", "max_abs", "kernel"),
    [
        ("UINT8", "UINT8", None, "u8u8 (exact; slower on x86)"),
        ("UINT8", "INT8", 64, "u8s8 (exact: |w| <= 64)"),
        ("UINT8", "INT8", 127, "u8s8 (saturates on x86 without VNNI: |w| > 64)"),
        ("INT8", "INT8", 100, "s8s8 (saturates on x86 without VNNI: |w| > 64)"),
    ],
)
def test_kernel_names_the_8_bit_kernel_and_whether_it_is_exact(
    activation_dtype: str, weight_dtype: str, max_abs: int | None, kernel: str
) -> None:
    layer = LayerInfo(
        name="l",
        op="Conv",
        weight_source="integer",
        weight_dtype=weight_dtype,
        weight_bits=8,
        activation="static",
        activation_dtype=activation_dtype,
        weight_max_abs=max_abs,
    )
    assert layer.kernel == kernel


def test_kernel_is_empty_where_no_8_bit_integer_product_runs() -> None:
    float_input = LayerInfo(
        name="l", op="MatMul", weight_source="integer", weight_dtype="INT8", weight_bits=8
    )
    four_bit = LayerInfo(
        name="l",
        op="MatMul",
        weight_source="integer",
        weight_dtype="INT4",
        weight_bits=4,
        activation="static",
        activation_dtype="UINT8",
    )
    assert float_input.kernel == "" and four_bit.kernel == ""


def test_dtype_names_and_bits_of_onnx_element_types() -> None:
    assert (dtype_name(TensorProto.INT4), dtype_bits(TensorProto.INT4)) == ("INT4", 4)
    assert (dtype_name(TensorProto.UINT8), dtype_bits(TensorProto.UINT8)) == ("UINT8", 8)
    assert (dtype_name(TensorProto.FLOAT16), dtype_bits(TensorProto.FLOAT16)) == ("FLOAT16", 16)
    assert dtype_bits(TensorProto.FLOAT) == 32
