"""export/ops.py: the custom ops the lowered model calls. Each passes torch.library.opcheck
(schema, fake kernel, autograd registration), computes what functional.py computes, and has an
ONNX translation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from edgequant import functional as F
from edgequant.export.ops import translation_table

G = torch.Generator().manual_seed(0)
X = torch.randn(4, 6, generator=G)
SCALE, ZERO_POINT = torch.tensor(0.05), torch.tensor(3)
LO, HI = torch.tensor(-1.0), torch.tensor(1.0)
WEIGHT_Q = torch.randint(-8, 8, (6, 4), dtype=torch.int8, generator=G)
WEIGHT_SCALE = torch.rand(6, generator=G) + 0.1

ARGS: dict[str, tuple[Any, ...]] = {
    "qdq": (X, SCALE, ZERO_POINT, LO, HI, 0, 255, -1, 8, False),
    "dq": (WEIGHT_Q, WEIGHT_SCALE, torch.zeros(6, dtype=torch.int8), 0, 0, 4, True),
    "quantize_int": (X, SCALE, ZERO_POINT, torch.tensor(1.0), LO, HI, 0, 255, 8, False),
    "dynamic_linear": (
        X,
        torch.randint(0, 256, (6, 3), dtype=torch.uint8, generator=G),
        torch.tensor(128, dtype=torch.uint8),
        torch.rand(3, generator=G) + 0.01,
        torch.zeros(3),
        True,
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(ARGS))
def test_each_op_passes_opcheck_and_has_an_onnx_translation(name: str) -> None:
    op = getattr(torch.ops.edgequant, name).default
    torch.library.opcheck(op, ARGS[name])
    assert op in translation_table()


def test_the_ops_compute_what_functional_computes() -> None:
    zp = ZERO_POINT.to(torch.int32)
    assert torch.equal(torch.ops.edgequant.qdq(*ARGS["qdq"]), F.fake_quantize(X, SCALE, zp, 0, 255))
    expected = F.dequantize(WEIGHT_Q, WEIGHT_SCALE, torch.zeros(6, dtype=torch.int32), 0)
    assert torch.equal(torch.ops.edgequant.dq(*ARGS["dq"]), expected)
    # quantize_int: the integer grid as integer-valued floats, q - zero_point.
    centered = torch.ops.edgequant.quantize_int(*ARGS["quantize_int"])
    assert torch.equal(centered, F.fake_quantize(X, SCALE, zp, 0, 255) / SCALE)
