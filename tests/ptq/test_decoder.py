"""The causal-LM path on a tiny randomly initialised LlamaForCausalLM (no file needed): dict
batches of token ids through eq.quantize(method="weight_only"), the decoder pipeline (AWQ,
clipping search, GPTQ) and its rule, tied embeddings, the ONNX export with
MatMulNBits and a KV cache, and the errors for bad input. The real SmolLM2 runs in the slow
test at the end (skipped without ../shared). Also covers ptq/awq.py, ptq/clip_search.py,
export/lm.py, export/matmul_nbits.py and examples/smollm2.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import edgequant as eq
from edgequant.metrics import perplexity
from edgequant.ptq import awq, clip_search
from edgequant.spec import QuantSpec, weight_spec

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, CONTEXT = 256, 64, 64


def tiny_llama(layers: int = 2, seed: int = 0, tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Outlier input channels, as trained LMs have: AWQ's scaling has something to find.
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[:4] = 8.0
            block.post_attention_layernorm.weight[5:8] = 6.0
    return model


def token_batches(count: int = 4, tokens: int = 32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (count, tokens), generator=g)
    return [
        {"input_ids": ids[i : i + 2], "attention_mask": torch.ones_like(ids[i : i + 2])}
        for i in range(0, count, 2)
    ]


def recipe(bits: int = 4, group: int | None = 32, **kw: object) -> eq.Recipe:
    return eq.Recipe(
        name=f"int{bits}", weight=weight_spec(bits, group), activation=None, first_last_bits=8, **kw
    )


def logits_error(model: torch.nn.Module, ref: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - ref(input_ids=ids).logits).pow(2).mean())


# --- quantize -----------------------------------------------------------------------------------


def test_weight_only_on_a_causal_lm_keeps_the_tied_table_and_runs_the_decoder_pipeline() -> None:
    model = tiny_llama()
    q = eq.quantize(model, recipe(), calib_data=token_batches(), method="weight_only")
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
    rtn = eq.quantize(model, recipe(3), method="weight_only")
    full = eq.quantize(model, recipe(3), calib_data=data, method="weight_only")
    assert logits_error(full, model, held_out) < 0.8 * logits_error(rtn, model, held_out)


def test_each_step_switches_off_in_the_recipe() -> None:
    model = tiny_llama()
    q = eq.quantize(
        model,
        recipe(awq=False, clip_search=False, rounding="nearest"),
        calib_data=token_batches(),
        method="weight_only",
    )
    pipeline = q.quant_info["pipeline"]
    assert not pipeline["awq"] and not pipeline["clip_search"] and pipeline["rounding"] == "nearest"
    assert pipeline["decoder"]["awq_alpha"] == {}
    rtn = eq.quantize(model, recipe(), method="weight_only")
    held_out = token_batches(2, 16, seed=3)[0]["input_ids"]
    with torch.no_grad():  # all three off: round to nearest on min/max ranges again
        assert torch.allclose(
            q(input_ids=held_out).logits, rtn(input_ids=held_out).logits, atol=1e-5
        )


def test_awq_folding_leaves_the_float_model_unchanged() -> None:
    model = tiny_llama()
    q = eq.quantize(
        model,
        recipe(clip_search=False, rounding="nearest"),
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


def test_awq_search_finds_scaling_for_an_outlier_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(512, 64)
    x[:, 3] *= 30.0
    h = x.T @ x
    spec = QuantSpec(bits=3, granularity="group", axis=1, group_size=32)
    s, alpha, plain, err = awq.search_scales([w], [spec], h, x.abs().mean(0))
    assert alpha > 0 and err < plain and s[3] == s.max()


def test_clip_search_never_raises_the_output_error_of_min_max() -> None:
    model = tiny_llama()
    q = eq.quantize(model, recipe(3), method="weight_only")
    layer = q.model.layers[0].mlp.down_proj
    x = torch.randn(256, layer.in_features)
    h = x.T @ x
    before = layer.weight_quantizer(layer.weight) - layer.weight
    ratios = clip_search.search_clipping(layer, h)
    after = layer.weight_quantizer(layer.weight) - layer.weight
    cost = lambda e: float(((e.detach().double() @ h.double()) * e.detach().double()).sum())  # noqa: E731
    assert cost(after) <= cost(before) + 1e-9
    assert ratios.shape == layer.weight_quantizer.scale.shape and float(ratios.min()) < 1.0


def test_the_rule_leaves_8_bit_and_non_decoder_models_alone() -> None:
    model = tiny_llama()
    q = eq.quantize(model, recipe(8), calib_data=token_batches(), method="weight_only")
    assert "decoder" not in q.quant_info["pipeline"]
    with pytest.raises(ValueError, match="decoder pipeline"):
        eq.quantize(
            torch.nn.Sequential(torch.nn.Linear(8, 8)),
            recipe(4, None, awq=True),
            calib_data=[torch.randn(2, 8)],
            method="weight_only",
        )


# --- bad input ----------------------------------------------------------------------------------


def test_group_size_that_does_not_divide_a_layer_names_it() -> None:
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*group_size 48"):
        eq.quantize(tiny_llama(), recipe(4, 48), calib_data=token_batches(), method="weight_only")


def test_text_without_a_tokenizer_is_refused_clearly() -> None:
    with pytest.raises(TypeError, match="Tokenize it first"):
        eq.quantize(tiny_llama(), recipe(), calib_data=[["some text"]], method="weight_only")
    with pytest.raises(TypeError, match="token ids"):
        eq.quantize(
            tiny_llama(), recipe(), calib_data=[{"input_ids": "text"}], method="weight_only"
        )


def test_sequences_longer_than_the_context_are_refused() -> None:
    long = token_batches(2, CONTEXT + 1)
    with pytest.raises(ValueError, match=f"{CONTEXT + 1} tokens, longer than the model's context"):
        eq.quantize(tiny_llama(), recipe(), calib_data=long, method="weight_only")
    with pytest.raises(ValueError, match="longer than the model's context"):
        perplexity(tiny_llama(), long[0]["input_ids"])


# --- export -------------------------------------------------------------------------------------


def test_export_runs_matmulnbits_with_a_kv_cache_and_verifies(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from edgequant.export.lm import DecoderGraph, export_lm_onnx, lm_session

    model = tiny_llama()
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=5)])
    with torch.no_grad():  # the restated graph computes what the Hugging Face model computes
        g = DecoderGraph(model)
        ref = model(input_ids=held_out[:1]).logits
        assert torch.allclose(g(held_out[:1], *g.empty_past())[0], ref, atol=1e-4)
    q = eq.quantize(model, recipe(), calib_data=token_batches(), method="weight_only")
    path = tmp_path / "lm.onnx"
    info = export_lm_onnx(q, path, verify_windows=held_out)
    assert info.agreement is not None and info.agreement >= 0.99
    assert info.matmul_nbits == 2 * 7 and info.tied_table
    graph = onnx.load(str(path)).graph
    assert not any(n.op_type == "MatMul" and n.input[1].startswith("w__") for n in graph.node)
    names = {i.name for i in graph.initializer}
    assert "lm_head.qweight" in names and "embed.qweight" not in names  # one table
    # The 8-bit lm_head keeps its codes in the file (the tied table) and runs as a float MatMul
    # on them: ONNX Runtime folds the dequantization into one weight when it loads the file.
    assert not any(n.op_type == "MatMulNBits" and n.name.startswith("lm_head") for n in graph.node)
    assert any("lm_head: 8-bit codes" in note for note in info.notes)
    # The kernel ONNX Runtime runs after its own graph optimisations is still MatMulNBits.
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in optimized.node) == 14
    folded = [n for n in optimized.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")]
    assert any(n.name.startswith("lm_head") for n in folded)
    assert not any(
        n.op_type in ("Cast", "Transpose") and "lm_head" in n.name for n in optimized.node
    )
    # Token-by-token decoding with the KV cache gives the logits of the full pass.
    session = lm_session(path)
    empty = np.zeros((1, 2, 0, 16), np.float32)
    past = {f"past_{k}_{i}": empty for i in range(2) for k in ("key", "value")}
    outputs = ["logits"] + [f"present_{k}_{i}" for i in range(2) for k in ("key", "value")]
    ids = held_out[:1].numpy()
    full = session.run(["logits"], {"input_ids": ids, **past})[0]
    steps = []
    for t in range(ids.shape[1]):
        out = session.run(outputs, {"input_ids": ids[:, t : t + 1], **past})
        steps.append(out[0])
        past = {
            f"past_{k}_{i}": out[1 + 2 * i + (k == "value")]
            for i in range(2)
            for k in ("key", "value")
        }
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < 1e-4
    fp32 = export_lm_onnx(model, tmp_path / "fp32.onnx", quantized=False)
    assert info.size_bytes < 0.4 * fp32.size_bytes


def test_export_of_an_untied_asymmetric_8_bit_lm_head_verifies(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from edgequant.export.lm import export_lm_onnx
    from edgequant.spec import LayerOverride, QuantSpec

    head = QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=0)
    r = recipe(overrides=(LayerOverride("lm_head", weight=head),))
    q = eq.quantize(tiny_llama(tied=False), r, method="weight_only")
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=5)])
    info = export_lm_onnx(q, tmp_path / "lm.onnx", verify_windows=held_out)
    assert info.agreement is not None and info.agreement >= 0.99
    assert not info.tied_table and info.matmul_nbits == 2 * 7
    inits = {i.name: i for i in onnx.load(str(tmp_path / "lm.onnx")).graph.initializer}
    assert {"lm_head.qweight", "embed.qweight"} <= set(inits)  # two tables
    assert list(inits["lm_head.centre"].dims)[0] == VOCAB  # its zero points, row by row
    assert any("lm_head: 8-bit codes" in note for note in info.notes)


def test_export_refuses_a_model_that_does_not_match_the_simulation(tmp_path, monkeypatch) -> None:
    from edgequant.export import lm, matmul_nbits

    q = eq.quantize(tiny_llama(), recipe(), calib_data=token_batches(), method="weight_only")
    real = matmul_nbits.pack_linear

    def wrong_scales(layer, name):  # a broken writer: every scale doubled
        packed = real(layer, name)
        packed.scales = packed.scales * 2.0
        return packed

    monkeypatch.setattr(matmul_nbits, "pack_linear", wrong_scales)
    path = tmp_path / "bad.onnx"
    with pytest.raises(lm.LMExportError, match="nothing written"):
        lm.export_lm_onnx(q, path, verify_windows=token_batches(2, 32)[0]["input_ids"])
    assert not path.exists()


def test_export_names_a_group_size_matmulnbits_cannot_take() -> None:
    from edgequant.export.matmul_nbits import pack_linear

    q = eq.quantize(tiny_llama(), recipe(4, 8), method="weight_only")
    with pytest.raises(ValueError, match=r"q_proj.*power of two"):
        pack_linear(q.model.layers[0].self_attn.q_proj, "model.layers.0.self_attn.q_proj")


@pytest.mark.slow
def test_smollm2_int4_g64_perplexity_close_to_the_reference() -> None:
    from edgequant.examples.shared import shared_dir

    if shared_dir() is None:
        pytest.skip("../shared (SmolLM2-135M, WikiText-2) is absent; set EDGEQUANT_SHARED")
    pytest.importorskip("gguf")
    from edgequant.examples.smollm2 import (
        TEST_TEXT,
        calibration_batches,
        load_smollm2,
        text_windows,
    )

    model, tokenizer = load_smollm2()
    test = text_windows(tokenizer, TEST_TEXT, 512, 4)
    q = eq.quantize(
        model,
        recipe(4, 64),
        calib_data=calibration_batches(tokenizer, 512, 16, 4),
        method="weight_only",
    )
    reference, quantized = perplexity(model, test), perplexity(q, test)
    assert math.isfinite(quantized) and quantized <= 1.06 * reference
