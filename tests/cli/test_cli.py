"""The edgequant command: inspect and bench, exit codes and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgequant.cli import COMMANDS, main

RNG = np.random.default_rng(0)


def _conv_model(path: Path, weight_type: int | None, input_shape: list | None = None) -> Path:
    """FP32 Conv (weight_type None) or Q->DQ activations with an integer per-axis weight."""
    nodes, inits = [], []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape or ["N", 4, 8, 8])
    if weight_type is None:
        inits.append(
            numpy_helper.from_array(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
        )
        conv_input = "x"
    else:
        low, high = (-8, 8) if weight_type == TensorProto.INT4 else (-128, 128)
        weight = RNG.integers(low, high, size=(8, 4, 3, 3))
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
        ]
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
            helper.make_tensor("w_q", weight_type, weight.shape, weight.flatten().tolist()),
            numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
        ]
        conv_input = "x_dq"
    nodes.append(helper.make_node("Conv", [conv_input, "w"], ["y"], pads=[1, 1, 1, 1], name="c"))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_subcommands_registered() -> None:
    assert {"inspect", "bench"} <= set(COMMANDS)


def test_inspect_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _conv_model(tmp_path / "int4.onnx", TensorProto.INT4)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "INT4" in out and "per-axis(0)" in out and "integer:       yes" in out


def test_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _conv_model(tmp_path / "fp32.onnx", None)
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["is_integer"] is False and data["n_float"] == 1


def test_bench_single(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _conv_model(tmp_path / "fp32.onnx", None)
    argv = ["bench", str(path), "--batch-sizes", "1", "2", "--runs", "2", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "latency bs1" in out and "latency bs2" in out and "ms" in out


def test_bench_vs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp32 = _conv_model(tmp_path / "fp32.onnx", None)
    int8 = _conv_model(tmp_path / "int8.onnx", TensorProto.INT8)
    argv = ["bench", str(int8), "--vs", str(fp32), "--batch-sizes", "1", "--runs", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "OTHER/MODEL" in out and "latency bs1" in out and "size" in out
    assert str(fp32) in out and str(int8) in out


@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    missing = tmp_path / "missing.onnx"
    assert main([command, str(missing)]) == 2
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and str(missing) in err_lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_not_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_text("definitely not protobuf\n")
    assert main([command, str(junk)]) == 2
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1
    assert f"{junk} is not an ONNX model" in err_lines[0]
    assert "Traceback" not in captured.err


def test_bench_vs_missing_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp32 = _conv_model(tmp_path / "fp32.onnx", None)
    missing = tmp_path / "other.onnx"
    assert main(["bench", str(fp32), "--vs", str(missing), "--runs", "1"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_bench_dynamic_dims_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _conv_model(tmp_path / "dyn.onnx", None, ["N", 4, "H", "W"])
    assert main(["bench", str(path), "--runs", "1"]) == 2
    assert "input 'x'" in capsys.readouterr().err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["bench", "m.onnx", "--runs", "many"]) == 2
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out


def test_python_dash_m_runs_the_command() -> None:
    """`python -m edgequant.cli` is the command without its console script (benchmarks use it)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "edgequant.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: edgequant" in done.stdout
