"""Weight-only PTQ (ptq/weight_only.py): activation quantizers dropped from any recipe, and the
rule that runs the decoder pipeline only on a decoder stack below 8 bits. The methods side by side
on the toy models are in test_quantize.py."""

from __future__ import annotations

import pytest
import torch
from toys import SmallCNN, lm_recipe, tensor_batches, tiny_llama, token_batches  # tests/toys.py

import edgequant as eq
from edgequant.instrument import quant_layers


def test_weight_only_drops_activation_quantizers_from_any_recipe() -> None:
    torch.manual_seed(0)
    model, calib = SmallCNN().eval(), tensor_batches((4, 3, 8, 8), 4, seed=10)
    qmodel = eq.quantize(model, "w4a4", calib, method="weight_only")
    assert all(m.input_quantizer is None for _, m in quant_layers(qmodel))
    assert qmodel.quant_info["recipe"]["activation"] is None


def test_the_rule_leaves_8_bit_and_non_decoder_models_alone() -> None:
    model = tiny_llama()
    q = eq.quantize(model, lm_recipe(8), calib_data=token_batches(), method="weight_only")
    assert "decoder" not in q.quant_info["pipeline"]
    with pytest.raises(ValueError, match="decoder pipeline"):
        eq.quantize(
            torch.nn.Sequential(torch.nn.Linear(8, 8)),
            lm_recipe(4, None, awq=True),
            calib_data=[torch.randn(2, 8)],
            method="weight_only",
        )
