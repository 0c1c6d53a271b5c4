"""The decoder pipeline (ptq/decoder.py) on a tiny randomly initialised LlamaForCausalLM (no file
needed): dict batches of token ids through eq.quantize(method="weight_only"), the pipeline (AWQ,
clipping search, GPTQ), tied embeddings, and the errors for bad input. AWQ, the clipping search,
the rule that turns the pipeline on, the LM export and the real SmolLM2 are tested beside their
modules (test_awq, test_clip_search, test_weight_only, tests/export/test_lm.py,
tests/examples/test_smollm2.py)."""

from __future__ import annotations

import pytest
import torch
from toys import LLAMA_CONTEXT, lm_recipe, tiny_llama, token_batches  # tests/toys.py

import edgequant as eq
from edgequant.metrics import perplexity

transformers = pytest.importorskip("transformers")


def logits_error(model: torch.nn.Module, ref: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - ref(input_ids=ids).logits).pow(2).mean())


def test_weight_only_on_a_causal_lm_keeps_the_tied_table_and_runs_the_decoder_pipeline() -> None:
    model = tiny_llama()
    q = eq.quantize(model, lm_recipe(), calib_data=token_batches(), method="weight_only")
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the original untouched
    for name in ("lm_head", "model.embed_tokens"):
        spec = q.get_submodule(name).weight_quantizer.spec
        assert (spec.bits, spec.granularity, spec.axis) == (8, "channel", 0)
    assert any("tied" in n for n in q.quant_summary.notes)
    pipeline = q.quant_info["pipeline"]
    assert pipeline["awq"] and pipeline["clip_search"] and pipeline["rounding"] == "gptq"
    assert pipeline["decoder"]["stack"] == "model.layers"
    assert "AWQ scaling" in pipeline["steps"]
    layer = q.model.layers[0].self_attn.q_proj
    wq = layer.weight_quantizer
    on_grid = wq(layer.weight)
    assert torch.equal(on_grid, layer.weight.detach())  # GPTQ wrote the weight on its grid


def test_decoder_pipeline_beats_round_to_nearest_on_held_out_tokens() -> None:
    model = tiny_llama()
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=7)])
    data = token_batches(8, 32)
    rtn = eq.quantize(model, lm_recipe(3), method="weight_only")
    full = eq.quantize(model, lm_recipe(3), calib_data=data, method="weight_only")
    assert logits_error(full, model, held_out) < 0.8 * logits_error(rtn, model, held_out)


def test_each_step_switches_off_in_the_recipe() -> None:
    model = tiny_llama()
    q = eq.quantize(
        model,
        lm_recipe(awq=False, clip_search=False, rounding="nearest", scale_refit=False),
        calib_data=token_batches(),
        method="weight_only",
    )
    pipeline = q.quant_info["pipeline"]
    assert not pipeline["awq"] and not pipeline["clip_search"] and pipeline["rounding"] == "nearest"
    assert not pipeline["scale_refit"]
    assert pipeline["decoder"]["awq_alpha"] == {}
    rtn = eq.quantize(model, lm_recipe(), method="weight_only")
    held_out = token_batches(2, 16, seed=3)[0]["input_ids"]
    with torch.no_grad():  # all four off: round to nearest on min/max ranges again
        assert torch.allclose(
            q(input_ids=held_out).logits, rtn(input_ids=held_out).logits, atol=1e-5
        )


def test_group_size_that_does_not_divide_a_layer_names_it() -> None:
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*group_size 48"):
        eq.quantize(
            tiny_llama(), lm_recipe(4, 48), calib_data=token_batches(), method="weight_only"
        )


def test_text_without_a_tokenizer_is_refused_clearly() -> None:
    with pytest.raises(TypeError, match="Tokenize it first"):
        eq.quantize(tiny_llama(), lm_recipe(), calib_data=[["some text"]], method="weight_only")
    with pytest.raises(TypeError, match="token ids"):
        eq.quantize(
            tiny_llama(), lm_recipe(), calib_data=[{"input_ids": "text"}], method="weight_only"
        )


def test_sequences_longer_than_the_context_are_refused() -> None:
    long = token_batches(2, LLAMA_CONTEXT + 1)
    with pytest.raises(
        ValueError, match=f"{LLAMA_CONTEXT + 1} tokens, longer than the model's context"
    ):
        eq.quantize(tiny_llama(), lm_recipe(), calib_data=long, method="weight_only")
    with pytest.raises(ValueError, match="longer than the model's context"):
        perplexity(tiny_llama(), long[0]["input_ids"])
