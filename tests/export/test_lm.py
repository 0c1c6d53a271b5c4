"""The causal-LM ONNX export (export/lm.py) of a tiny random Llama: MatMulNBits, the tied table, a
KV cache that decodes token by token as the full pass does, and refusal of a file that does not
match the simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toys import LLAMA_VOCAB, lm_recipe, tiny_llama, token_batches  # tests/toys.py

import edgequant as eq
from edgequant.export import lm, matmul_nbits
from edgequant.export.lm import DecoderGraph, export_lm_onnx, lm_session
from edgequant.spec import LayerOverride, QuantSpec

transformers = pytest.importorskip("transformers")


def test_export_runs_matmulnbits_with_a_kv_cache_and_verifies(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    model = tiny_llama()
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=5)])
    with torch.no_grad():  # the restated graph computes what the Hugging Face model computes
        g = DecoderGraph(model)
        ref = model(input_ids=held_out[:1]).logits
        assert torch.allclose(g(held_out[:1], *g.empty_past())[0], ref, atol=1e-4)
    # Float inputs (block_int8_inputs off): today's export, MatMulNBits at the default level.
    r = lm_recipe(block_int8_inputs=False)
    q = eq.quantize(model, r, calib_data=token_batches(), method="weight_only")
    assert q.quant_info["pipeline"]["block_int8_inputs"] is False
    path = tmp_path / "lm.onnx"
    info = export_lm_onnx(q, path, verify_windows=held_out)
    assert info.agreement is not None and info.agreement >= 0.99
    assert info.matmul_nbits == 2 * 7 and info.tied_table
    assert not any(
        a.name == "accuracy_level" for n in onnx.load(str(path)).graph.node for a in n.attribute
    )
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
    # Per block: q/k/v merged into one MatMulNBits, o, gate/up merged, down.
    assert sum(n.op_type == "MatMulNBits" for n in optimized.node) == 2 * 4
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


def _levels(path) -> dict[str, int]:
    """accuracy_level of each MatMulNBits node in the file, by node name (0: the default)."""
    import onnx

    return {
        n.name: next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
        for n in onnx.load(str(path)).graph.node
        if n.op_type == "MatMulNBits"
    }


@pytest.mark.parametrize("tied", [True, False])
def test_int8_inputs_by_default_export_accuracy_level_4_and_verify(tmp_path, tied) -> None:
    """The default for a 4-bit LLaMA-style LM rounds every quantized Linear's input to int8 per
    block in the simulation; the file runs every MatMulNBits (the lm_head too, still one table
    with the embedding when tied) at accuracy_level=4 and verifies against the simulation's
    noise floor."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = tiny_llama(tied=tied)
    q = eq.quantize(model, lm_recipe(), calib_data=token_batches(), method="weight_only")
    pipeline = q.quant_info["pipeline"]
    assert pipeline["block_int8_inputs"] == "all" and len(pipeline["block_int8_layers"]) == 15
    assert "accuracy_level=4" in pipeline["reasons"]["block_int8_inputs"]
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=5)])
    path = tmp_path / "lm.onnx"
    info = export_lm_onnx(q, path, verify_windows=held_out)
    assert info.agreement_floor is not None and info.logit_distance_floor is not None
    assert info.perplexity_floor is not None and info.perplexity_deployed is not None
    moved = abs(info.perplexity_deployed / info.perplexity_simulated - 1)
    assert moved <= max(lm.PPL_TOLERANCE, lm.PPL_FLOOR_FACTOR * info.perplexity_floor)
    assert info.agreement >= info.agreement_floor - lm.AGREEMENT_SLACK
    assert info.logit_distance <= lm.DISTANCE_FACTOR * info.logit_distance_floor
    assert any("noise floor" in note for note in info.notes)
    assert info.tied_table is tied and info.matmul_nbits == 2 * 7 + 1
    levels = _levels(path)
    assert levels.pop("lm_head/MatMulNBits") == 4
    assert len(levels) == 2 * 4 and set(levels.values()) == {4}  # q/k/v and gate/up merged
    # ONNX Runtime keeps them as MatMulNBits after its own optimisations.
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert set(_levels(tmp_path / "optimized.onnx").values()) == {4}
    # The int8 rounding changes the simulated logits beyond float rounding: what is verified
    # is the rounding, not a no-op.
    with torch.no_grad():
        ids = held_out[:1]
        with_int8 = q(input_ids=ids).logits
        for m in q.modules():
            if getattr(m, "input_block_int8", None) is not None:
                m.input_block_int8 = None
        without = q(input_ids=ids).logits
    assert (with_int8 - without).abs().max() > 1e-3


def test_lm_head_only_int8_inputs_verify_token_by_token(tmp_path) -> None:
    """block_int8_inputs="lm_head": only the lm_head at accuracy_level=4, the 4-bit layers at
    the default level, and the exact verification (no noise floor)."""
    pytest.importorskip("onnxruntime")
    r = lm_recipe(block_int8_inputs="lm_head")
    q = eq.quantize(tiny_llama(), r, calib_data=token_batches(), method="weight_only")
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=5)])
    info = export_lm_onnx(q, tmp_path / "lm.onnx", verify_windows=held_out)
    assert info.agreement is not None and info.agreement >= lm.MIN_AGREEMENT
    assert info.agreement_floor is None and info.logit_distance is None
    levels = _levels(tmp_path / "lm.onnx")
    assert levels.pop("lm_head/MatMulNBits") == 4 and set(levels.values()) == {0}


def test_export_of_an_untied_asymmetric_8_bit_lm_head_verifies(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    head = QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=0)
    r = lm_recipe(overrides=(LayerOverride("lm_head", weight=head),), block_int8_inputs=False)
    q = eq.quantize(tiny_llama(tied=False), r, method="weight_only")
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=5)])
    info = export_lm_onnx(q, tmp_path / "lm.onnx", verify_windows=held_out)
    assert info.agreement is not None and info.agreement >= 0.99
    assert not info.tied_table and info.matmul_nbits == 2 * 7
    inits = {i.name: i for i in onnx.load(str(tmp_path / "lm.onnx")).graph.initializer}
    assert {"lm_head.qweight", "embed.qweight"} <= set(inits)  # two tables
    assert list(inits["lm_head.centre"].dims)[0] == LLAMA_VOCAB  # its zero points, row by row
    assert any("lm_head: 8-bit codes" in note for note in info.notes)


@pytest.mark.parametrize("scope", ["all", "lm_head", False])
def test_export_refuses_a_model_that_does_not_match_the_simulation(
    tmp_path, monkeypatch, scope
) -> None:
    """Token by token and against the noise floor alike, a broken writer is refused."""
    r = lm_recipe(block_int8_inputs=scope)
    q = eq.quantize(tiny_llama(), r, calib_data=token_batches(), method="weight_only")
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
