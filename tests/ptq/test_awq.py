"""AWQ (ptq/awq.py): the scale search on an outlier channel, and its folding, which leaves the
float function of a tiny Llama unchanged."""

from __future__ import annotations

import torch
from toys import lm_recipe, tiny_llama, token_batches  # tests/toys.py

import edgequant as eq
from edgequant.ptq import awq
from edgequant.spec import QuantSpec


def test_awq_search_finds_scaling_for_an_outlier_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(512, 64)
    x[:, 3] *= 30.0
    h = x.T @ x
    spec = QuantSpec(bits=3, granularity="group", axis=1, group_size=32)
    s, alpha, plain, err = awq.search_scales([w], [spec], h, x.abs().mean(0))
    assert alpha > 0 and err < plain and s[3] == s.max()


def test_awq_folding_leaves_the_float_model_unchanged() -> None:
    model = tiny_llama()
    q = eq.quantize(
        model,
        # Float inputs: only the folding is under test.
        lm_recipe(clip_search=False, rounding="nearest", block_int8_inputs=False),
        calib_data=token_batches(),
        method="weight_only",
    )
    assert any(a > 0 for a in q.quant_info["pipeline"]["decoder"]["awq_alpha"].values())
    for m in q.modules():
        if getattr(m, "weight_quantizer", None) is not None:
            m.weight_quantizer.mode = "disabled"
    ids = token_batches(2, 16, seed=3)[0]["input_ids"]
    with torch.no_grad():
        a, b = q(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-4
