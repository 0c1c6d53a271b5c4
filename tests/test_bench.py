"""bench: latency dicts, random inputs from the signature, sizes. Never asserts a time bound."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgequant import bench

RNG = np.random.default_rng(0)


def _save(nodes: list, inputs: list, outputs: list, inits: list, path: Path) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def fp32_conv(path: Path, input_shape: list | None = None) -> Path:
    weight = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    return _save(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape or ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])],
        [numpy_helper.from_array(weight, "w")],
        path,
    )


def int8_qdq_conv(path: Path) -> Path:
    weight = RNG.integers(-128, 128, size=(8, 4, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
        helper.make_node("Conv", ["x_dq", "w"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
    ]
    return _save(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])],
        inits,
        path,
    )


def token_model(path: Path) -> Path:
    """input_ids -> embedding Gather, times the attention mask: int64 inputs, dynamic length."""
    embedding = RNG.standard_normal((100, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask_3d"]),
        helper.make_node("Mul", ["tokens", "mask_3d"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    inits = [
        numpy_helper.from_array(embedding, "embedding"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4])]
    return _save(nodes, inputs, outputs, inits, path)


def test_latency_keys_and_positive(tmp_path: Path) -> None:
    latency = bench.latency_ms(fp32_conv(tmp_path / "m.onnx"), batch_sizes=(1, 4), warmup=1, runs=3)
    assert list(latency) == ["bs1", "bs4"]
    assert all(isinstance(v, float) and v > 0 for v in latency.values())


def test_default_batch_sizes(tmp_path: Path) -> None:
    latency = bench.latency_ms(fp32_conv(tmp_path / "m.onnx"), warmup=0, runs=1, threads=1)
    assert list(latency) == ["bs1", "bs64"]


def test_compare_latency_ratio(tmp_path: Path) -> None:
    a = fp32_conv(tmp_path / "fp32.onnx")
    b = int8_qdq_conv(tmp_path / "int8.onnx")
    result = bench.compare_latency(a, b, batch_sizes=(1, 2), warmup=1, runs=3)
    assert set(result) == {"a", "b", "ratio"}
    for key in ("bs1", "bs2"):
        assert result["a"][key] > 0 and result["b"][key] > 0
        assert result["ratio"][key] == pytest.approx(result["b"][key] / result["a"][key])


def test_compare_latency_times_each_run_after_an_untimed_one_of_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Side by side, a timed run right after the other model's run measures that session's
    still-spinning thread pool too; each timed run follows an untimed one of its own model."""
    a = fp32_conv(tmp_path / "fp32.onnx")
    b = int8_qdq_conv(tmp_path / "int8.onnx")
    calls: list[str] = []
    real = bench.ort_session

    def recording_session(path: Any, threads: int) -> Any:
        session = real(path, threads)
        name = Path(path).stem

        class Recording:
            def __getattr__(self, attr: str) -> Any:
                return getattr(session, attr)

            def run(self, *args: Any) -> Any:
                calls.append(name)
                return session.run(*args)

        return Recording()

    monkeypatch.setattr(bench, "ort_session", recording_session)
    bench.compare_latency(a, b, batch_sizes=(1,), warmup=0, runs=4)
    assert calls == ["fp32", "fp32", "int8", "int8", "int8", "int8", "fp32", "fp32"] * 2


def test_dynamic_non_batch_dims_need_input_shapes(tmp_path: Path) -> None:
    path = fp32_conv(tmp_path / "m.onnx", ["N", 4, "H", "W"])
    with pytest.raises(ValueError, match="input 'x' has a dynamic dimension 'H'"):
        bench.latency_ms(path, batch_sizes=(1,), warmup=1, runs=3)
    latency = bench.latency_ms(
        path, batch_sizes=(1, 2), input_shapes={"x": (None, 4, 8, 8)}, warmup=1, runs=3
    )
    assert list(latency) == ["bs1", "bs2"]
    with pytest.raises(ValueError, match=r"input_shapes\['x'\] has 2 dimensions"):
        bench.latency_ms(path, batch_sizes=(1,), input_shapes={"x": (None, 4)}, warmup=1, runs=3)


def test_fixed_batch_dimension_is_reported(tmp_path: Path) -> None:
    path = fp32_conv(tmp_path / "m.onnx", [1, 4, 8, 8])
    assert list(bench.latency_ms(path, batch_sizes=(1,), warmup=1, runs=3)) == ["bs1"]
    with pytest.raises(ValueError, match="fixed batch dimension of 1"):
        bench.latency_ms(path, batch_sizes=(1, 64), warmup=1, runs=3)


def test_integer_inputs(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = token_model(tmp_path / "tokens.onnx")
    shapes = {"input_ids": (None, 7), "attention_mask": (None, 7)}
    latency = bench.latency_ms(path, batch_sizes=(1, 3), input_shapes=shapes, warmup=1, runs=3)
    assert list(latency) == ["bs1", "bs3"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = bench._random_feeds(session, 3, shapes, np.random.default_rng(0))
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].shape == (3, 7)
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 100
    assert (feeds["attention_mask"] == 1).all()


def test_argument_checks(tmp_path: Path) -> None:
    path = fp32_conv(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="batch_sizes"):
        bench.latency_ms(path, batch_sizes=(0,))
    with pytest.raises(ValueError, match="runs"):
        bench.latency_ms(path, runs=0)
    with pytest.raises(ValueError, match="threads"):
        bench.latency_ms(path, threads=0)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        bench.latency_ms(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello")
    with pytest.raises(ValueError, match="junk.onnx is not an ONNX model"):
        bench.latency_ms(junk)


def test_sizes_and_weight_report(tmp_path: Path) -> None:
    fp32 = fp32_conv(tmp_path / "fp32.onnx")
    int8 = int8_qdq_conv(tmp_path / "int8.onnx")
    assert bench.file_size_bytes(fp32) == os.path.getsize(fp32)
    assert bench.file_size_bytes(int8) < bench.file_size_bytes(fp32)
    report = bench.model_weight_report(int8)
    assert report["is_integer"] is True
    assert report["layers"][0]["weight_dtype"] == "INT8"
    assert bench.model_weight_report(fp32)["is_integer"] is False
