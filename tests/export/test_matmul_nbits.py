"""MatMulNBits packing (export/matmul_nbits.py): a group size it cannot take is named."""

from __future__ import annotations

import pytest
from toys import lm_recipe, tiny_llama  # tests/toys.py

import edgequant as eq
from edgequant.export.matmul_nbits import pack_linear


def test_export_names_a_group_size_matmulnbits_cannot_take() -> None:
    q = eq.quantize(tiny_llama(), lm_recipe(4, 8), method="weight_only")
    with pytest.raises(ValueError, match=r"q_proj.*power of two"):
        pack_linear(q.model.layers[0].self_attn.q_proj, "model.layers.0.self_attn.q_proj")
