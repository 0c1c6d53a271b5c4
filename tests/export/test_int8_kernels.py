"""Signed-activation targets (tflite-int8, mcu-int8) on ordinary CNNs: the export verifies, the
file keeps the target's INT8 weights with zero point 0, and the copy verification runs on an x86
CPU without VNNI (exact_kernel_model) computes what ONNX Runtime's reference kernels compute on
the file as written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn

import edgequant as eq
from edgequant.export.passes import exact_kernel_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, numpy_helper  # noqa: E402


class VGGish(nn.Module):
    """Conv-BN-ReLU, max pooling, average pooling, reshape, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch_F.max_pool2d(torch_F.relu(self.b1(self.c1(x))), 2)
        x = torch_F.avg_pool2d(torch_F.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.reshape(x.shape[0], -1))


class KeywordSpotter(nn.Module):
    """Depthwise-separable: depthwise conv, 1x1 convs, average pooling, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 16, 3, padding=1)
        self.dw, self.bn = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.pool = nn.AvgPool2d((8, 5))
        self.fc = nn.Linear(24, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch_F.relu(self.c0(x))
        x = torch_F.relu(self.bn(self.dw(x)))
        x = self.pool(torch_F.relu(self.pw(x)))
        return self.fc(x.flatten(1))


def _model(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = VGGish() if name == "vgg" else KeywordSpotter()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    shape = (3, 16, 16) if name == "vgg" else (1, 8, 5)
    gen = torch.Generator().manual_seed(1)
    return model.eval(), [torch.randn(8, *shape, generator=gen) for _ in range(3)]


def _run(source: object, x: np.ndarray, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


@pytest.mark.parametrize("target", ["tflite-int8", "mcu-int8"])
@pytest.mark.parametrize("name", ["vgg", "kws"])
def test_signed_targets_export_and_verify(name: str, target: str, tmp_path: Path) -> None:
    model, data = _model(name)
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target(target), data, method="static")
    path = tmp_path / "m.onnx"
    # Before the fix: 25-33 dB on the VGG (ONNX Runtime's u8s8 kernel saturating), refused.
    info = eq.export_onnx(qmodel, path, data[0], verify_data=data[1:])
    assert info.verification.sqnr_db > 100
    assert info.verification.top1_agreement == 1.0
    # The file keeps the target's grid: INT8 weights, zero point 0.
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    weights = [t for t in graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == TensorProto.INT8 for t in weights)
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(node.input) > 2:
            assert not numpy_helper.to_array(inits[node.input[2]]).any()


def test_exact_kernel_copy_computes_the_reference(tmp_path: Path) -> None:
    """The copy with UINT8 weights, fully optimized, equals the file as written run on ONNX
    Runtime's reference kernels (no graph optimization), up to the float Gemm's summation order
    (the saturating kernel is off by up to 0.06)."""
    model, data = _model("vgg")
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target("tflite-int8"), data)
    path = tmp_path / "m.onnx"
    eq.export_onnx(qmodel, path, data[0])
    written = onnx.load(str(path))
    copy, names = exact_kernel_model(written)
    assert sorted(names) == ["c1.weight_q", "c2.weight_q", "fc.weight_q"]
    x = data[1].numpy()
    reference = _run(str(path), x, optimize=False)
    fused = _run(copy.SerializeToString(), x, optimize=True)
    np.testing.assert_allclose(fused, reference, rtol=0, atol=1e-6)
    with torch.no_grad():
        simulated = qmodel(data[1]).numpy()
    np.testing.assert_allclose(reference, simulated, rtol=0, atol=1e-5)
