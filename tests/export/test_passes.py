"""Signed (INT8) activation grids through data movement: ONNX Runtime 1.32 propagates a
DequantizeLinear across Slice/Reshape/Transpose/Squeeze/Unsqueeze/MaxPool itself when the model
loads, and for an INT8 zero point the QuantizeLinear it inserts fails type inference. The export
inserts those pairs itself (export.passes.requantize_after_moves), changing no value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as torch_F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import edgequant as eq
from edgequant.export.passes import requantize_after_moves


def _graph(zero_point: np.ndarray, moves: list[str]) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> moves... -> Relu -> y, on a (2, 4, 6, 6) input."""
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
        numpy_helper.from_array(zero_point, "zero_point"),
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([6], np.int64), "ends"),
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
        numpy_helper.from_array(np.array([2], np.int64), "steps"),
        numpy_helper.from_array(np.array([2, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["t0"]),
    ]
    for i, op in enumerate(moves):
        src, dst = f"t{i}", f"t{i + 1}"
        if op == "Slice":
            node = helper.make_node(op, [src, "starts", "ends", "axes", "steps"], [dst])
        elif op == "Reshape":
            node = helper.make_node(op, [src, "shape"], [dst])
        elif op == "Transpose":
            node = helper.make_node(op, [src], [dst], perm=[0, 1, 3, 2])
        else:
            node = helper.make_node(op, [src], [dst], kernel_shape=[2, 2], strides=[2, 2])
        nodes.append(node)
    nodes.append(helper.make_node("Relu", [f"t{len(moves)}"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "moves",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "moves", [["Slice"], ["Transpose"], ["Reshape"], ["MaxPool"], ["Slice", "Transpose"]]
)
def test_int8_grid_after_moves_loads_with_the_same_values(moves: list[str]) -> None:
    x = np.random.default_rng(0).normal(size=(2, 4, 6, 6)).astype(np.float32)
    model = _graph(np.array(0, np.int8), moves)
    reference = _run(model, x, optimize=False)  # ORT without its graph transformers
    with pytest.raises(Exception, match="y_zero_point"):
        _run(model, x)  # the ONNX Runtime failure this works around
    assert requantize_after_moves(model) == len(moves)
    assert np.array_equal(_run(model, x), reference)
    assert requantize_after_moves(model) == 0  # nothing left to do


def test_unsigned_grids_are_left_alone() -> None:
    model = _graph(np.array(128, np.uint8), ["Slice", "Transpose"])
    before = model.SerializeToString()
    assert requantize_after_moves(model) == 0
    assert model.SerializeToString() == before


class Shortcut(nn.Module):
    """A stem, then a second branch joined to a stride-2 conv, in one of several forms that leave a
    data-movement op between a quantized tensor and a float reader."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16 if form in ("pad_value", "cat_zeros") else 8, 3, 2, 1)
        self.head = nn.Linear(self.conv.out_channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = torch_F.relu(self.stem(x))
        if self.form == "pad_value":  # option A, padded with a value other than 0
            shortcut = torch_F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4), value=0.25)
        elif self.form == "cat_zeros":  # option A, zero channels by concatenation
            half = x[:, :, ::2, ::2]
            shortcut = torch.cat([half, torch.zeros_like(half)], 1)
        else:  # max-pooled shortcut
            shortcut = torch_F.max_pool2d(x, 2)
        y = torch_F.relu(self.conv(x) + shortcut)
        logits = self.head(torch_F.adaptive_avg_pool2d(y, 1).flatten(1))
        return (logits, x.flatten(1)) if self.form == "features" else logits


@pytest.mark.parametrize(
    ("form", "target"),
    [
        ("pad_value", "dsp-pow2"),
        ("cat_zeros", "tflite-int8"),
        ("maxpool", "tensorrt"),
        ("features", "dsp-pow2"),  # a quantized tensor, flattened, is a graph output
    ],
)
def test_signed_targets_export_data_movement_of_quantized_tensors(
    form: str, target: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 12, 12, generator=g) for _ in range(2)]
    qmodel = eq.quantize(Shortcut(form).eval(), eq.Recipe.preset("w8a8").for_target(target), calib)
    info = eq.export_onnx(qmodel, tmp_path / "m.onnx", calib[0][:4], verify_data=calib)
    assert info.verification.passed
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    moves = {
        "pad_value": "Slice",
        "cat_zeros": "Slice",
        "maxpool": "MaxPool",
        "features": "Reshape",
    }
    readers = {i: n.op_type for n in graph.node for i in n.input}
    moved = [n for n in graph.node if n.op_type == moves[form]]
    assert moved and all(readers.get(n.output[0]) == "QuantizeLinear" for n in moved)
