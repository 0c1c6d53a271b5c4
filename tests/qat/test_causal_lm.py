"""QAT of a causal LM on a tiny randomly initialised LlamaForCausalLM (no file needed): prepare_qat
from the weight-only PTQ model with dict batches of token ids, fit_qat distilling the FP32
model's next-token distributions and keeping the better held-out epoch, the LM export of the
trained model, and the errors for bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as torch_F
from toys import LLAMA_CONTEXT, lm_recipe, tiny_llama, token_batches  # tests/toys.py

import edgequant as eq
from edgequant.qat import finalize

transformers = pytest.importorskip("transformers")


def heldout_kl(model: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(teacher || model) of the next-token distributions over every position."""
    with torch.no_grad():
        p = torch_F.log_softmax(teacher(input_ids=ids).logits, -1).flatten(0, 1)
        q = torch_F.log_softmax(model(input_ids=ids).logits, -1).flatten(0, 1)
    return float(torch_F.kl_div(q, p, log_target=True, reduction="batchmean"))


def test_prepare_qat_on_a_causal_lm_starts_from_the_weight_only_ptq_model() -> None:
    model = tiny_llama()
    data = token_batches()
    ptq = eq.quantize(model, lm_recipe(3), calib_data=data, method="weight_only")
    q = eq.prepare_qat(model, lm_recipe(3), calib_data=data)
    assert q.quant_info["method"] == "qat" and q.quant_info["pipeline"]["rounding"] == "gptq"
    ids = token_batches(2, 16, seed=3)[0]["input_ids"]
    q.eval()
    with torch.no_grad():  # training off: it is the PTQ model
        assert torch.allclose(q(input_ids=ids).logits, ptq(input_ids=ids).logits, atol=1e-5)
    # ... int8 inputs per block included (its MatMulNBits form at accuracy_level=4).
    for name in ("lm_head", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        block = q.get_submodule(name).input_block_int8
        assert block is not None and torch.equal(block, ptq.get_submodule(name).input_block_int8)
    # The tied token table stays one table: frozen, both grids as PTQ left them.
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert not q.model.embed_tokens.weight.requires_grad
    assert any("share one token table" in n for n in q.quant_summary.notes)
    trained = {n for n, p in q.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.down_proj.weight" in trained
    assert "model.layers.0.mlp.down_proj.weight_quantizer.learned_scale" in trained
    assert not any(n.startswith(("lm_head.", "model.embed_tokens.")) for n in trained)


def test_fit_qat_distils_a_causal_lm_keeps_the_better_epoch_and_exports() -> None:
    model = tiny_llama()
    teacher = copy.deepcopy(model)
    q = eq.prepare_qat(model, lm_recipe(3), calib_data=token_batches())
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=11)])
    start_kl = heldout_kl(q.eval(), model, held_out)
    start_weight = q.model.layers[0].mlp.up_proj.weight.detach().clone()
    history = eq.fit_qat(
        q,
        token_batches(16, 32, seed=5),
        epochs=2,
        lr=0.05,
        teacher=teacher,
        val_data=token_batches(8, 32, seed=9),
        progress=False,
    )
    chosen = q.quant_info["qat_selection"]
    assert chosen["against"].startswith("next tokens") and chosen["held_out_sequences"] == 8
    ppl = chosen["heldout_perplexity"]
    assert len(ppl) == 3 and all("heldout_perplexity" in h for h in history)
    # Never worse than the start on the held-out text it chose on.
    assert ppl[chosen["kept_epoch"]] <= ppl[0]
    if chosen["kept_epoch"] == 0:
        assert torch.equal(q.model.layers[0].mlp.up_proj.weight, start_weight)
    else:
        assert heldout_kl(q, model, held_out) < start_kl
    for name, p in model.named_parameters():  # the FP32 model is untouched
        assert torch.equal(p, dict(teacher.named_parameters())[name])
    from edgequant.export.lm import export_lm_onnx

    final = finalize(q)
    info = export_lm_onnx(final, _tmp_path() / "qat.onnx", verify_windows=held_out)
    assert info.agreement is not None and info.agreement >= 0.99 and info.tied_table


def test_fit_qat_lowers_the_distillation_loss_while_it_trains() -> None:
    model = tiny_llama()
    q = eq.prepare_qat(model, lm_recipe(3), calib_data=token_batches())
    history = eq.fit_qat(
        q,
        token_batches(16, 32, seed=5),
        epochs=2,
        lr=0.05,
        teacher=model,
        select="last",
        progress=False,
    )
    assert history[-1]["loss"] < history[0]["loss"]


def _tmp_path():  # noqa: ANN202
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="edgequant-test-"))


def test_bad_lm_input_to_qat_is_named() -> None:
    model = tiny_llama()
    with pytest.raises(TypeError, match="Tokenize it first"):
        eq.prepare_qat(model, lm_recipe(3), calib_data=[{"text": ["some words"]}])
    with pytest.raises(ValueError, match=f"{LLAMA_CONTEXT + 1} tokens, longer than the model"):
        eq.prepare_qat(model, lm_recipe(3), calib_data=token_batches(2, LLAMA_CONTEXT + 1))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*group_size 48"):
        eq.prepare_qat(model, lm_recipe(4, 48), calib_data=token_batches())
    q = eq.prepare_qat(model, lm_recipe(3), calib_data=token_batches())
    with pytest.raises(TypeError, match="train_data item 0 is text"):
        eq.fit_qat(q, [{"text": ["a"]}, {"text": ["b"]}], teacher=model, progress=False)
    with pytest.raises(
        TypeError, match=r"keys \[.attention_mask.\]\): a tokenizer-less text batch"
    ):
        eq.fit_qat(
            q,
            [{"attention_mask": torch.ones(2, 8, dtype=torch.long)}] * 2,
            teacher=model,
            select="last",
            progress=False,
        )
    with pytest.raises(
        ValueError, match=f"train_data item 0 holds sequences of {LLAMA_CONTEXT + 1}"
    ):
        eq.fit_qat(
            q, token_batches(2, LLAMA_CONTEXT + 1), teacher=model, select="last", progress=False
        )
