"""nn.TransformerEncoderLayer and nn.MultiheadAttention take a fused fast path in eval mode that
never calls their submodules: the quantized copy takes the reference path instead, so linear1
and linear2 see calibration data and the export verifies; the projections stay float, with a
note."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import Attention, EncoderLayer  # tests/zoo.py

import edgequant as eq
from edgequant.slow_paths import SlowPathTransformerEncoderLayer

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("method", ["static", "dynamic", "weight_only"])
def test_encoder_layer_quantizes_its_linears_and_exports(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = EncoderLayer().eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 5, 8, generator=gen) for _ in range(2)]
    # Before: "layer 'layer.linear1.input': no calibration data reached this quantizer".
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8"), data, method=method)
    quantized = {r.name for r in qmodel.quant_summary.quantized}
    assert {"layer.linear1", "layer.linear2"} <= quantized
    notes = " ".join(qmodel.quant_summary.notes)
    assert "layer.self_attn (MultiheadAttention): its fused fast path is off" in notes
    assert "in_proj_weight" in notes
    # Static quantization also quantizes its attention matmuls (tests/test_attention.py).
    assert ("layer.self_attn.quant_matmuls.0" in notes) == (method == "static")
    # The caller's model keeps its class and its fast path.
    assert type(model.layer) is nn.TransformerEncoderLayer
    assert type(qmodel.layer) is SlowPathTransformerEncoderLayer
    with torch.no_grad():
        float_out = model(data[0])
    assert torch.backends.mha.get_fastpath_enabled()
    info = eq.export_onnx(qmodel, tmp_path / "m.onnx", data[0], verify_data=data[1:])
    assert info.verification.passed
    assert torch.backends.mha.get_fastpath_enabled()  # restored after every call
    assert float_out.shape == (4, 3)


def test_multihead_attention_alone_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    qmodel = eq.quantize(Attention().eval(), eq.Recipe.preset("w8a8"), data)
    assert any("attn (MultiheadAttention)" in n for n in qmodel.quant_summary.notes)
    assert eq.export_onnx(qmodel, tmp_path / "m.onnx", data[0]).verification.passed


def test_weight_only_linear_on_tokens_deploys_what_is_simulated(tmp_path: Path) -> None:
    """8-bit weight-only Linear layers on (batch, tokens, features) inputs: ONNX Runtime's
    MatMulNBits would quantize their float activations to int8 (46 dB); exported as Gemm on a
    2-D view they match the simulation to float rounding."""
    torch.manual_seed(0)
    model = EncoderLayer().eval()
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8"), data, method="weight_only")
    info = eq.export_onnx(qmodel, tmp_path / "m.onnx", data[0], verify_data=data[1:])
    assert info.verification.sqnr_db > 100
