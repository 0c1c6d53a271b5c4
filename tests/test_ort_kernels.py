"""The simulation rounds as ONNX Runtime's fused QLinearConv / QLinearAdd kernels do: the
emulations against the kernels themselves, and a model where the fake-quantized graph and the
deployed model land one step apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import edgequant as eq
from edgequant.modules import QuantConv2d, fast_simulation
from edgequant.ort_kernels import (
    FusedRequantize,
    QLinearAddSim,
    add_uses_fma,
    qlinear_add,
    qlinearconv_requantize,
)

needs_x86 = pytest.mark.skipif(add_uses_fma() is None, reason="QLinearAdd emulated on x86 only")


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feed)[0])


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(value, name)


@needs_x86
@pytest.mark.parametrize("signed", [False, True])
def test_qlinear_add_matches_onnxruntime(signed: bool) -> None:
    rng = np.random.default_rng(0)
    dtype, (lo, hi) = (np.int8, (-128, 127)) if signed else (np.uint8, (0, 255))
    elem = TensorProto.INT8 if signed else TensorProto.UINT8
    for trial in range(20):
        a = rng.integers(lo, hi + 1, 4099).astype(dtype)
        b = rng.integers(lo, hi + 1, 4099).astype(dtype)
        scales = tuple(np.float32(s) for s in rng.uniform(0.005, 0.1, 3))
        zps = tuple(int(z) for z in rng.integers(lo // 2, hi // 2 + 1, 3))
        node = helper.make_node(
            "QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"],
            domain="com.microsoft",
        )  # fmt: skip
        inits = [
            _const(n, np.array(s, np.float32))
            for n, s in zip(("sa", "sb", "sy"), scales, strict=True)
        ]
        inits += [
            _const(n, np.array(z, dtype)) for n, z in zip(("za", "zb", "zy"), zps, strict=True)
        ]
        graph = helper.make_graph(
            [node], f"add{trial}",
            [helper.make_tensor_value_info(n, elem, [4099]) for n in ("a", "b")],
            [helper.make_tensor_value_info("y", elem, [4099])], inits,
        )  # fmt: skip
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        )
        deployed = _run(model, {"a": a, "b": b}).astype(np.int64)
        emulated = qlinear_add(
            torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32)),
            tuple(float(s) for s in scales), zps, (lo, hi), fma=bool(add_uses_fma()),
        )  # fmt: skip
        np.testing.assert_array_equal(emulated.numpy().astype(np.int64), deployed)


def test_qlinearconv_requantize_matches_onnxruntime() -> None:
    """A 1x1 QLinearConv over many inputs and channels: the emulated requantization of the
    exact integer accumulator gives ONNX Runtime's codes, every one."""
    rng = np.random.default_rng(1)
    channels_in, channels_out = 16, 32
    x = rng.integers(0, 256, (4, channels_in, 16, 16)).astype(np.uint8)
    w = rng.integers(-64, 65, (channels_out, channels_in, 1, 1)).astype(np.int8)
    bias = rng.integers(-5000, 5000, channels_out).astype(np.int32)
    s_x, s_y = np.float32(0.0213), np.float32(0.0371)
    s_w = rng.uniform(0.001, 0.02, channels_out).astype(np.float32)
    node = helper.make_node(
        "QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"]
    )
    inits = [
        _const("sx", np.array(s_x)), _const("zx", np.array(0, np.uint8)), _const("w", w),
        _const("sw", s_w), _const("zw", np.zeros(channels_out, np.int8)),
        _const("sy", np.array(s_y)), _const("zy", np.array(3, np.uint8)), _const("b", bias),
    ]  # fmt: skip
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits,
    )  # fmt: skip
    deployed = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), {"x": x})
    acc = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double())
    total = acc + torch.from_numpy(bias).double().reshape(1, -1, 1, 1)
    multiplier = (torch.tensor(s_x) * torch.from_numpy(s_w)) / torch.tensor(s_y)
    emulated = qlinearconv_requantize(total, multiplier.reshape(1, -1, 1, 1), 3, 0, 255)
    np.testing.assert_array_equal(emulated.numpy().astype(np.uint8), deployed)


# From the pretrained ResNet-20 W8A8 (its first conv, channel 0): accumulator 5639 + bias 6565 =
# 12204, exactly (12204 x 0.018658448 x 0.009429599 / 0.02882138 = 74.499996) just under a tie. In
# float32 QLinearConv's product is 74.5, rounded half to even: 74; the fake-quantized graph's
# scaled value times the float32 reciprocal of the output scale is 74.50001: 75.
S_IN, S_W, S_OUT = 0.01865844801068306, 0.009429599158465862, 0.028821375221014023  # float32s


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 1, 1)
        self.conv_b = nn.Conv2d(1, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv_a(x))
        return self.conv_b(y) + y  # y has two readers: the graph quantizes it once


def _tie_model() -> tuple[nn.Module, torch.Tensor]:
    """A W8A8 conv -> ReLU -> (conv + shortcut) model whose first conv's output sits on that
    tie."""
    torch.manual_seed(0)
    calib = [torch.rand(8, 2, 4, 4) * 4.0]
    qmodel = eq.quantize(_TwoConvs().eval(), "w8a8", calib)
    conv_a, conv_b = qmodel.conv_a, qmodel.conv_b
    assert isinstance(conv_a, QuantConv2d) and isinstance(conv_b, QuantConv2d)
    for q, scale in ((conv_a.input_quantizer, S_IN), (conv_b.input_quantizer, S_OUT)):
        # conv_b's input quantizer is the shared one the graph put after the ReLU.
        assert q is not None
        q.scale.fill_(scale)
        q.zero_point.fill_(0)
    assert conv_a.weight_quantizer is not None and conv_a.bias is not None
    conv_a.weight_quantizer.scale.fill_(S_W)
    with torch.no_grad():
        # Weight codes 63 and 1 (within 7 bits, should reduce_range pick them), bias code 6565.
        conv_a.weight.copy_(torch.tensor([63.0, 1.0]).reshape(1, 2, 1, 1) * S_W)
        acc_scale = torch.tensor(S_IN, dtype=torch.float32) * torch.tensor(S_W)
        conv_a.bias.fill_(float(6565 * acc_scale))
    # Input codes 89 and 32: the accumulator is 63 x 89 + 1 x 32 = 5639.
    x = torch.tensor([89.0, 32.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2) * S_IN
    return qmodel, x


def _deployed(qmodel: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    eq.export_onnx(qmodel, path, x, min_top1_agreement=0.0, min_sqnr_db=-1e9)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(np.asarray(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]))


@needs_x86
def test_simulation_rounds_a_near_tie_as_the_deployed_model(tmp_path: Path) -> None:
    qmodel, x = _tie_model()
    conv_a = qmodel.conv_a
    fused = conv_a.__dict__.get("fused_requantize")
    assert isinstance(fused, FusedRequantize) and fused.relu
    deployed = _deployed(qmodel, x, tmp_path / "tie.onnx")
    with torch.no_grad():
        simulated = qmodel(x)
        quantizer = qmodel.conv_b.input_quantizer
        codes = torch.round(quantizer(torch.relu(conv_a(x))) / S_OUT)
    assert codes.unique().tolist() == [74.0]
    torch.testing.assert_close(simulated, deployed, rtol=1e-6, atol=0.0)
    # The fake-quantized graph's arithmetic (no fusion) lands a step above, and so does its output.
    del conv_a.__dict__["fused_requantize"]
    with torch.no_grad():
        unfused = qmodel(x)
        codes = torch.round(quantizer(torch.relu(conv_a(x))) / S_OUT)
    assert codes.unique().tolist() == [75.0]
    assert not torch.allclose(unfused, deployed, rtol=1e-3, atol=0.0)


def test_fused_add_runs_only_in_eval_mode_outside_calibration() -> None:
    from toys import small_resnet_case  # tests/toys.py

    model, calib, test = small_resnet_case(32)
    qmodel = eq.quantize(model, "w8a8", calib)
    adds = [m for m in qmodel.modules() if isinstance(m, QLinearAddSim)]
    assert adds, "the residual adds of a W8A8 ResNet are QLinearAdd in ONNX Runtime"
    a, b = torch.randn(2, 4, 3, 3) * 0.1, torch.randn(2, 4, 3, 3) * 0.1
    add = adds[0]
    assert not add.training  # as the quantized model, which quantize returns in eval mode
    with fast_simulation(qmodel):
        assert not add.exact_integer
        assert torch.equal(add(a, b), a + b)
    assert add.exact_integer
    add.train()
    assert torch.equal(add(a, b), a + b)


def test_other_targets_keep_the_fake_quantized_graph() -> None:
    from toys import small_resnet_case  # tests/toys.py

    model, calib, _ = small_resnet_case(32)
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target("tflite-int8"), calib)
    assert not any(isinstance(m, QLinearAddSim) for m in qmodel.modules())
    assert not any("fused_requantize" in m.__dict__ for m in qmodel.modules())
