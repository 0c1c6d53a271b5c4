"""inspect_onnx on tiny hand-built ONNX models, each checked to run in ONNX Runtime first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgequant.export.inspect import InspectReport, inspect_onnx

OPSET = 21
RNG = np.random.default_rng(0)


def _save_and_run(graph: onnx.GraphProto, path: Path, feeds: dict[str, np.ndarray]) -> Path:
    """Check the model, save it, and run it once in ONNX Runtime: every test model is valid."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    assert all(np.isfinite(output).all() for output in outputs)
    return path


def _image() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)}


def _conv_io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8]),
    )


def _activation_qdq(zero_point_dtype: type = np.uint8) -> tuple[list, list]:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero_point"], ["x_dq"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, zero_point_dtype), "x_zero_point"),
    ]
    return nodes, inits


def fp32_conv(path: Path) -> Path:
    weight = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv0")
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b"),
    ]
    graph = helper.make_graph([conv], "fp32", [*_conv_io()[:1]], [_conv_io()[1]], inits)
    return _save_and_run(graph, path, _image())


def qdq_conv(path: Path, weight_type: int = TensorProto.INT8, zero_point: int = 0) -> Path:
    """x -> Q -> DQ -> Conv <- DQ <- integer weight initializer (per output channel)."""
    low, high = (-8, 8) if weight_type == TensorProto.INT4 else (-128, 128)
    weight = RNG.integers(low, high, size=(8, 4, 3, 3))
    # make_tensor takes plain ints and packs INT4 two to a byte.
    weight_init = helper.make_tensor("w_q", weight_type, weight.shape, weight.flatten().tolist())
    act_nodes, act_inits = _activation_qdq()
    nodes = [
        *act_nodes,
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero_point"], ["w"], axis=0),
        helper.make_node("Conv", ["x_dq", "w"], ["y"], pads=[1, 1, 1, 1], name="conv0"),
    ]
    inits = [
        *act_inits,
        weight_init,
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
        helper.make_tensor("w_zero_point", weight_type, [8], [zero_point] * 8),
    ]
    graph = helper.make_graph(nodes, "qdq", [_conv_io()[0]], [_conv_io()[1]], inits)
    return _save_and_run(graph, path, _image())


def test_fp32_conv_is_float(tmp_path: Path) -> None:
    report = inspect_onnx(fp32_conv(tmp_path / "fp32.onnx"))
    (layer,) = report.layers
    assert (layer.name, layer.op, layer.weight_source) == ("conv0", "Conv", "float")
    assert layer.weight_dtype == "FLOAT" and layer.weight_bits == 32
    assert layer.activation == "float"
    assert not layer.quantized
    assert (report.n_quantized, report.n_float) == (0, 1)
    assert report.is_integer is False
    assert report.initializer_bytes == {"FLOAT": (8 * 4 * 9 + 8) * 4}


def test_int8_per_axis_qdq_conv(tmp_path: Path) -> None:
    path = qdq_conv(tmp_path / "int8.onnx")
    report = inspect_onnx(path)
    (layer,) = report.layers
    assert layer.weight_source == "integer"
    assert (layer.weight_dtype, layer.weight_bits) == ("INT8", 8)
    assert layer.weight_initializer == "w_q" and layer.weight_shape == (8, 4, 3, 3)
    assert (layer.granularity, layer.axis, layer.scale_shape) == ("per-axis(0)", 0, (8,))
    assert layer.zero_point_zero is True
    assert (layer.activation, layer.activation_dtype) == ("static", "UINT8")
    assert report.is_integer is True
    assert (report.n_quantized, report.n_float) == (1, 0)
    assert report.initializer_bytes["INT8"] == 8 * 4 * 9 + 8
    assert report.file_size_bytes == os.path.getsize(path)


def test_int4_weight_is_packed_and_reported(tmp_path: Path) -> None:
    report = inspect_onnx(qdq_conv(tmp_path / "int4.onnx", TensorProto.INT4, zero_point=1))
    (layer,) = report.layers
    assert (layer.weight_source, layer.weight_dtype, layer.weight_bits) == ("integer", "INT4", 4)
    assert layer.zero_point_zero is False
    assert report.is_integer is True
    # 288 weights + 8 zero points, two to a byte.
    assert report.initializer_bytes["INT4"] == 288 // 2 + 8 // 2


def test_int4_round_trip_through_numpy_helper() -> None:
    # onnx 1.23 unpacks INT4 (and sign-extends it) in to_array; inspect relies on it.
    values = [-8, -1, 0, 7, 3]
    tensor = helper.make_tensor("t", TensorProto.INT4, [5], values)
    assert numpy_helper.to_array(tensor).astype(np.int8).tolist() == values


def test_fake_quant_weight_is_not_integer(tmp_path: Path) -> None:
    """A float initializer -> Q -> DQ is simulated quantization: the file still stores FP32."""
    act_nodes, act_inits = _activation_qdq()
    nodes = [
        *act_nodes,
        helper.make_node("QuantizeLinear", ["w_f", "w_scale", "w_zp"], ["w_q"], axis=0),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("Conv", ["x_dq", "w"], ["y"], pads=[1, 1, 1, 1], name="conv0"),
    ]
    inits = [
        *act_inits,
        numpy_helper.from_array(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32), "w_f"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
        helper.make_tensor("w_zp", TensorProto.INT4, [8], [0] * 8),
    ]
    graph = helper.make_graph(nodes, "fq", [_conv_io()[0]], [_conv_io()[1]], inits)
    report = inspect_onnx(_save_and_run(graph, tmp_path / "fq.onnx", _image()))
    (layer,) = report.layers
    assert (layer.weight_source, layer.weight_dtype) == ("fake-quant", "FLOAT")
    assert layer.weight_bits == 4  # the simulated bits, from the QuantizeLinear's zero point
    assert layer.granularity == "per-axis(0)"
    assert not layer.quantized
    assert report.is_integer is False


def _matmul_graph(tmp_path: Path) -> Path:
    """Blocked INT4 weight stored [out, in] behind a Transpose, a float Gemm, and x @ x^T."""
    weight = RNG.integers(-8, 8, size=(32, 64))
    nodes = [
        helper.make_node(
            "DequantizeLinear", ["w_q", "w_scale"], ["w_t"], axis=1, block_size=16, name="dq"
        ),
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"),
        helper.make_node("Gemm", ["h", "w2"], ["h2"], transB=1, name="fc2"),
        helper.make_node("Transpose", ["h2"], ["h2_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "h2_t"], ["y"], name="scores"),
    ]
    inits = [
        helper.make_tensor("w_q", TensorProto.INT4, weight.shape, weight.flatten().tolist()),
        numpy_helper.from_array(np.full((32, 4), 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(RNG.standard_normal((16, 32)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])],
        inits,
    )
    feeds = {"x": RNG.standard_normal((3, 64)).astype(np.float32)}
    return _save_and_run(graph, tmp_path / "mm.onnx", feeds)


def test_traces_through_transpose_and_skips_weightless_matmul(tmp_path: Path) -> None:
    report = inspect_onnx(_matmul_graph(tmp_path))
    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == {"fc1", "fc2", "scores"}
    fc1 = layers["fc1"]
    assert (fc1.weight_source, fc1.weight_dtype, fc1.weight_bits) == ("integer", "INT4", 4)
    assert (fc1.granularity, fc1.axis, fc1.block_size) == ("blocked(16)", 1, 16)
    assert fc1.scale_shape == (32, 4)
    assert fc1.activation == "float"
    assert layers["fc2"].weight_source == "float" and layers["fc2"].op == "Gemm"
    assert layers["scores"].weight_source == "none" and not layers["scores"].has_weight
    assert (report.n_quantized, report.n_float, report.n_without_weight) == (1, 1, 1)
    assert report.is_integer is False


def test_dynamic_matmul_integer(tmp_path: Path) -> None:
    """ONNX Runtime's quantize_dynamic pattern: DynamicQuantizeLinear -> MatMulInteger."""
    weight = RNG.integers(-128, 128, size=(16, 8)).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_scale", "x_zp"]),
        helper.make_node(
            "MatMulInteger", ["x_q", "w_q", "x_zp", "w_zp"], ["acc"], name="fc_dynamic"
        ),
        helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_scale", "w_scale"], ["scale"]),
        helper.make_node("Mul", ["acc_f", "scale"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.02, np.float32), "w_scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    feeds = {"x": RNG.standard_normal((2, 16)).astype(np.float32)}
    report = inspect_onnx(_save_and_run(graph, tmp_path / "dyn.onnx", feeds))
    (layer,) = report.layers
    assert (layer.weight_source, layer.weight_dtype, layer.weight_bits) == ("integer", "INT8", 8)
    assert (layer.granularity, layer.zero_point_zero) == ("per-tensor", True)
    assert (layer.activation, layer.activation_dtype) == ("dynamic", "UINT8")
    assert report.is_integer is True


def test_int8_activation_dtype_from_zero_point(tmp_path: Path) -> None:
    act_nodes, act_inits = _activation_qdq(np.int8)
    weight = RNG.integers(-128, 128, size=(8, 4, 3, 3)).astype(np.int8)
    nodes = [
        *act_nodes,
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),
        helper.make_node("Conv", ["x_dq", "w"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [
        *act_inits,
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
    ]
    graph = helper.make_graph(nodes, "s8", [_conv_io()[0]], [_conv_io()[1]], inits)
    report = inspect_onnx(_save_and_run(graph, tmp_path / "s8.onnx", _image()))
    (layer,) = report.layers
    assert layer.name == "Conv_3"  # unnamed nodes are named by op and position
    assert (layer.granularity, layer.scale_shape, layer.axis) == ("per-tensor", (), None)
    assert (layer.activation, layer.activation_dtype) == ("static", "INT8")


def test_external_data_counts_in_file_size(tmp_path: Path) -> None:
    path = qdq_conv(tmp_path / "int8.onnx")
    model = onnx.load(path)
    external = tmp_path / "ext.onnx"
    onnx.save(model, external, save_as_external_data=True, location="ext.data", size_threshold=0)
    report = inspect_onnx(external)
    assert report.file_size_bytes == os.path.getsize(external) + os.path.getsize(
        tmp_path / "ext.data"
    )
    assert report.layers[0].weight_dtype == "INT8" and report.is_integer


def test_format_and_to_dict(tmp_path: Path) -> None:
    report = inspect_onnx(qdq_conv(tmp_path / "int4.onnx", TensorProto.INT4))
    text = report.format()
    assert "conv0" in text and "INT4" in text and "per-axis(0)" in text
    assert "integer:       yes" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["is_integer"] is True and data["n_quantized"] == 1
    assert data["layers"][0]["weight_bits"] == 4
    assert data["layers"][0]["scale_shape"] == [8]


def test_user_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        inspect_onnx(tmp_path / "missing.onnx")
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model\n")
    with pytest.raises(ValueError, match="notes.onnx is not an ONNX model"):
        inspect_onnx(not_onnx)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.onnx is not an ONNX model"):
        inspect_onnx(empty)


def test_no_weight_layers_is_not_integer(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    feeds = {"x": np.ones(2, np.float32)}
    report = inspect_onnx(_save_and_run(graph, tmp_path / "relu.onnx", feeds))
    assert isinstance(report, InspectReport)
    assert report.layers == [] and report.is_integer is False


@pytest.mark.parametrize("saturates_here", [True, False])
def test_file_notes_and_saturating_kernels_on_this_cpu(
    tmp_path: Path, saturates_here: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's own notes (metadata "edgequant.*") are reported; a layer whose u8s8 kernel
    saturates on x86 without VNNI (INT8 weights with |w| > 64 beside UINT8 activations) is named
    as inexact where inspect runs on such a CPU."""
    from edgequant.export import inspect as inspect_module

    path = qdq_conv(tmp_path / "int8.onnx")  # weights in -128..127
    model = onnx.load(str(path))
    helper.set_model_props(model, {"edgequant.int8_weights": "a note", "producer.other": "x"})
    onnx.save(model, str(path))
    monkeypatch.setattr(inspect_module, "u8s8_saturates_here", lambda: saturates_here)
    report = inspect_onnx(path)
    assert report.notes == {"edgequant.int8_weights": "a note"}
    assert report.to_dict()["notes"] == report.notes
    text = report.format()
    assert "note:          a note" in text
    warning = "this CPU:      x86 without VNNI: the u8s8 kernels of 1 layers saturate here"
    assert (warning in text) is saturates_here
