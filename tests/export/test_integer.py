"""The fully integer target (mcu-int8): the graph property of its exports, and run_integer, the
integer-only reference runner, against ONNX Runtime, and its input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import edgequant as eq
from edgequant.export.integer import run_integer
from edgequant.export.integer_graph import IntegerGraphError, fully_integer_violations


class Net(nn.Module):
    """Residual add, ReLU6, concatenation, strided-slice + zero-pad shortcut, max pool, average
    pool, flatten: every activation edge a fully integer target must quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.conv4 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.conv2(x))
        x = torch.cat([x, F.relu6(self.conv3(x))], 1)
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        x = F.relu(self.conv4(x) + shortcut)
        x = F.adaptive_avg_pool2d(self.pool(x), 1)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    calib = [torch.randn(16, 3, 16, 16) for _ in range(3)]
    return model, calib, torch.randn(96, 3, 16, 16)


def _export(model: nn.Module, calib: list[torch.Tensor], target: str, path: Path) -> eq.ExportInfo:
    recipe = eq.Recipe.preset("w8a8").for_target(target)
    qmodel = eq.quantize(model, recipe, calib, method="static")
    return eq.export_onnx(qmodel, path, calib[0][:4], verify_data=calib)


@pytest.fixture(scope="module")
def mcu(data: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, eq.ExportInfo]:
    model, calib, _ = data
    path = tmp_path_factory.mktemp("mcu") / "net.onnx"
    return path, _export(model, calib, "mcu-int8", path)


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_mcu_export_is_fully_integer(mcu: tuple[Path, eq.ExportInfo]) -> None:
    path, info = mcu
    assert info.fully_integer is True
    assert fully_integer_violations(path) == []
    ops = _ops(path)
    for op in ("Add", "Concat", "MaxPool", "Slice", "Pad", "Gemm"):
        assert op in ops
    assert "ReduceMean" in ops or "GlobalAveragePool" in ops or "AveragePool" in ops
    # ReLU and ReLU6 are the following quantizers' ranges, and x[:, :, ::2, ::2] one Slice.
    assert "Relu" not in ops and "Clip" not in ops
    assert ops.count("Slice") == 1
    # The logits are quantized too: the graph output comes from a DequantizeLinear.
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    assert producer[graph.output[0].name] == "DequantizeLinear"


@pytest.fixture(scope="module")
def ort_target(data: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, eq.ExportInfo]:
    model, calib, _ = data
    path = tmp_path_factory.mktemp("ort") / "net.onnx"
    return path, _export(model, calib, "onnxruntime", path)


def test_mcu_model_saves_and_loads(data: tuple) -> None:
    """eq.load rebuilds the same edges (the target travels in the recipe)."""
    model, calib, x = data
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    qmodel = eq.quantize(model, recipe, calib[:1], method="static")
    loaded = eq.load(model, recipe, qmodel.state_dict(), calib[0])
    with torch.no_grad():
        assert torch.equal(qmodel(x[:8]), loaded(x[:8]))
    assert any("fully integer" in n for n in loaded.quant_summary.notes)


def test_export_refuses_a_float_op_on_a_fully_integer_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, 2))
    calib = [torch.randn(8, 3, 4, 4)]
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    # eq.quantize refuses it before calibrating, naming the op and the layer ...
    with pytest.raises(ValueError, match=r"op 'sigmoid' at '1'"):
        eq.quantize(model, recipe, calib)
    # ... and the export refuses a model that got past that (through the static pipeline itself).
    from edgequant.ptq.static import quantize_static

    qmodel = quantize_static(model, recipe, calib, 8, False)
    assert any("left in float" in n and "Sigmoid" in n for n in qmodel.quant_summary.notes)
    path = tmp_path / "sigmoid.onnx"
    with pytest.raises(eq.ExportError, match=r"mcu-int8 needs a fully integer graph.*\(Sigmoid\)"):
        eq.export_onnx(qmodel, path, calib[0])
    assert not path.exists()


def test_other_targets_keep_their_graphs(ort_target: tuple[Path, eq.ExportInfo]) -> None:
    """The checker does fail: an onnxruntime export keeps float logits, ReLUs and the add's
    float output path, and is not checked for the property."""
    path, info = ort_target
    assert info.fully_integer is None
    problems = fully_integer_violations(path)
    assert any("Gemm" in p and "graph output" in p for p in problems)
    assert "Relu" in _ops(path)


def test_run_integer_matches_onnx_runtime(data: tuple, mcu: tuple[Path, eq.ExportInfo]) -> None:
    import onnxruntime as ort

    _, _, x = data
    path, _ = mcu
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    out = run_integer(path, x, batch_size=40)
    assert isinstance(out, np.ndarray) and out.shape == ref.shape and out.dtype == np.float32
    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    last_dq = next(n for n in graph.node if n.output[0] == graph.output[0].name)
    lsb = float(consts[last_dq.input[1]])
    assert np.abs(out - ref).max() <= lsb * 1.0001
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # Every output is on the output grid: integers times the scale.
    levels = out / lsb
    assert np.allclose(levels, np.round(levels), atol=1e-3)


def test_float64_and_int64_accumulation_agree(data: tuple, mcu: tuple[Path, eq.ExportInfo]) -> None:
    _, _, x = data
    path, _ = mcu
    a = run_integer(path, x[:16], matmul="float64")
    b = run_integer(path, x[:16], matmul="int64")
    assert np.array_equal(a, b)


def test_run_integer_refuses_a_graph_that_is_not_fully_integer(
    data: tuple, ort_target: tuple[Path, eq.ExportInfo]
) -> None:
    x = data[2]
    path, _ = ort_target
    # Its first layer's weights are stored as uint8 with zero point 128 (export.int8_kernels.as_uint8),
    # which is what the runner meets first; graphs with other layouts fail on a float edge.
    with pytest.raises(
        IntegerGraphError, match=r"node '\w+' \(\w+\): .*(not fully integer|target 'mcu-int8')"
    ):
        run_integer(path, x[:4])


def _tiny_graph(op: str, path: Path, batch: int | str = 2) -> None:
    """x (batch, 4) -> Q -> DQ -> op -> Q -> DQ -> y."""
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"),
        helper.make_node(op, ["xd"], ["h"], name="the_op"),
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"], name="q_out"),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["y"], name="dq_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [s, z],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_unsupported_op_names_node_and_op_type(tmp_path: Path) -> None:
    path = tmp_path / "sigmoid.onnx"
    _tiny_graph("Sigmoid", path)
    assert fully_integer_violations(path) == []  # the property holds; the runner has no kernel
    with pytest.raises(IntegerGraphError, match=r"node 'the_op' \(Sigmoid\): no integer kernel"):
        run_integer(path, np.zeros((2, 4), np.float32))


def test_standalone_relu_runs_on_integers(tmp_path: Path) -> None:
    path = tmp_path / "relu.onnx"
    _tiny_graph("Relu", path)
    x = np.array([[-1.0, -0.02, 0.03, 2.0], [0.5, -0.5, 6.4, 7.0]], np.float32)
    y = run_integer(path, x)
    assert np.allclose(y, np.clip(np.round(np.maximum(x, 0) / 0.05), 0, 127) * 0.05)


def test_input_errors(tmp_path: Path) -> None:
    path = tmp_path / "relu.onnx"
    _tiny_graph("Relu", path)
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        run_integer(tmp_path / "missing.onnx", np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        run_integer(path, np.zeros((2, 4), np.float32), batch_size=0)
    with pytest.raises(ValueError, match="the model takes 1 inputs"):
        run_integer(path, [np.zeros((2, 4), np.float32)] * 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        run_integer(path, np.full((2, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="matmul must be"):
        run_integer(path, np.zeros((2, 4), np.float32), matmul="float32")


def test_shape_of_the_float_input_is_no_float_edge(
    mcu: tuple[Path, eq.ExportInfo], data: tuple, tmp_path: Path
) -> None:
    """The exporter reads a dynamic batch size with Shape of the graph's float input (e.g. for
    out.view(out.size(0), -1)); Shape and Size read no values, so the graph stays fully integer
    and the integer runner computes the same outputs."""
    path, _ = mcu
    model = onnx.load(str(path))
    graph = model.graph
    reshape = next(n for n in graph.node if n.op_type in ("Reshape", "Flatten"))
    source = graph.input[0].name
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "batch_index"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        ]
    )
    nodes = [
        helper.make_node("Shape", [source], ["input_shape"], name="node_Shape_0"),
        helper.make_node("Size", [source], ["input_size"], name="node_Size_0"),
        helper.make_node("Gather", ["input_shape", "batch_index"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0),
    ]
    if reshape.op_type == "Flatten":  # make it a Reshape to that shape
        reshape.op_type = "Reshape"
        del reshape.attribute[:]
        reshape.input.append("flat_shape")
    else:
        reshape.input[1] = "flat_shape"
    index = list(graph.node).index(reshape)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    grafted = tmp_path / "grafted.onnx"
    onnx.save(model, str(grafted))
    assert fully_integer_violations(grafted) == []
    x = data[2][:8].numpy()
    expected = run_integer(path, x)
    np.testing.assert_array_equal(run_integer(grafted, x), expected)


def test_run_integer_on_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    # Was: protobuf's DecodeError; for an empty file "the model takes 0 inputs [], got 1".
    notes = tmp_path / "notes.onnx"
    notes.write_text("not a model")
    with pytest.raises(ValueError, match="notes.onnx is not an ONNX model"):
        eq.run_integer(notes, np.zeros((2, 4), np.float32))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.onnx is not an ONNX model"):
        eq.run_integer(empty, np.zeros((2, 4), np.float32))


def test_run_integer_refuses_inputs_of_the_wrong_shape(tmp_path: Path) -> None:
    # Was: run silently on a (2, 5) input (a wrong-sized conv input gives wrong numbers too).
    path = tmp_path / "relu.onnx"
    _tiny_graph("Relu", path, batch="N")
    assert eq.run_integer(path, np.ones((3, 4), np.float32)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"input 'x' has shape \(2, 5\); the model takes \(N, 4\)"):
        eq.run_integer(path, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"input 'x' has shape \(4,\); the model takes \(N, 4\)"):
        eq.run_integer(path, np.zeros(4, np.float32))


def test_run_integer_refuses_an_empty_batch(tmp_path: Path) -> None:
    # Was: IndexError "list index out of range".
    path = tmp_path / "relu.onnx"
    _tiny_graph("Relu", path, batch="N")
    with pytest.raises(ValueError, match=r"inputs hold an empty batch: \[\(0, 4\)\]"):
        eq.run_integer(path, np.zeros((0, 4), np.float32))


def test_run_integer_names_the_keys_given(tmp_path: Path) -> None:
    # Was: "no value for the model's inputs ['x']; it takes ['x']" (not the keys given), and
    # batch_size=True taken as 1.
    path = tmp_path / "relu.onnx"
    _tiny_graph("Relu", path, batch="N")
    with pytest.raises(ValueError, match=r"it takes \['x'\], got \['input'\]"):
        eq.run_integer(path, {"input": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match="batch_size must be a positive int, got True"):
        eq.run_integer(path, np.zeros((2, 4), np.float32), batch_size=True)
