"""Bad input to eq.export_onnx and eq.run_integer fails at the boundary with a message that names
the argument and the value, before any export work, and leaves the user's model and files alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgequant as eq

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def qmlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    calib = list(torch.randn(64, 16).split(16))
    return eq.quantize(model, "w8a8", calib), calib[0]


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks that belong before any export work: reaching the exporter fails the test."""

    def exporter_reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("export_onnx went on to export")

    monkeypatch.setattr(torch.onnx, "export", exporter_reached)


# --- export_onnx: example_inputs and verify_data --------------------------------------------------


def test_example_inputs_of_the_wrong_shape_name_the_layer(
    tmp_path: Path, qmlp: tuple, no_export: None
) -> None:
    # Was: ExportError wrapping torch.export's multi-screen TorchExportError.
    qmodel, _ = qmlp
    with pytest.raises(
        ValueError,
        match=r"example_inputs \(a Tensor \(4, 15\) float32\) do not run through the model: "
        r"layer '0' \(QuantLinear\) raised RuntimeError: mat1 and mat2",
    ):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(4, 15))
    assert list(tmp_path.iterdir()) == []


def test_nan_in_example_inputs_is_named(tmp_path: Path, qmlp: tuple, no_export: None) -> None:
    # Was: "the exported model does not compute what the simulation computes: top-1 agreement".
    qmodel, x = qmlp
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"example_inputs\[0\] holds NaN \(1 of 256 values\)"):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x)


def test_empty_example_batch_is_refused(tmp_path: Path, qmlp: tuple, no_export: None) -> None:
    # Was: a file written, "verified in ONNX Runtime on 0 samples".
    qmodel, _ = qmlp
    with pytest.raises(
        ValueError, match=r"example_inputs\[0\] has an empty batch \(shape \(0, 16\)\)"
    ):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(0, 16))
    assert list(tmp_path.iterdir()) == []


def test_float64_example_inputs_are_a_type_error(
    tmp_path: Path, qmlp: tuple, no_export: None
) -> None:
    # Was: "ONNX Runtime cannot load the exported model: ... Type 'tensor(double)' ...".
    qmodel, x = qmlp
    with pytest.raises(
        TypeError, match=r"example_inputs\[0\] has dtype torch.float64.*\.float\(\)"
    ):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x.double())


def test_integer_example_inputs_to_a_float_layer(tmp_path: Path, qmlp: tuple) -> None:
    # Was: "ONNX Runtime cannot load the exported model: ... Type 'tensor(int64)' ...".
    qmodel, _ = qmlp
    with pytest.raises(ValueError, match=r"example_inputs: the model's input '\w+' is int64"):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", torch.randint(0, 3, (4, 16)))
    assert list(tmp_path.iterdir()) == []


def test_verify_data_must_be_batches(tmp_path: Path, qmlp: tuple, no_export: None) -> None:
    # Was: TypeError "'int' object is not iterable"; for a tensor, ONNX Runtime's "Invalid rank".
    qmodel, x = qmlp
    with pytest.raises(TypeError, match="verify_data must be an iterable of batches.*got int"):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x, verify_data=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"verify_data .* got a tensor of shape \(8, 16\)"):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x, verify_data=torch.randn(8, 16))


def test_verify_data_batch_with_nan_is_named(tmp_path: Path, qmlp: tuple, no_export: None) -> None:
    qmodel, x = qmlp
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"verify_data\[1\]\[0\] holds NaN"):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x, verify_data=[x, bad])


def test_verify_data_batch_of_the_wrong_shape_is_named(tmp_path: Path, qmlp: tuple) -> None:
    # Was: a bare RuntimeError "mat1 and mat2 shapes cannot be multiplied" from the simulation.
    qmodel, x = qmlp
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an earlier model")
    with pytest.raises(
        ValueError, match=r"verify_data\[0\] \(a Tensor \(4, 15\) float32\) .*layer '0'"
    ):
        eq.export_onnx(qmodel, path, x, verify_data=[torch.randn(4, 15)])
    assert path.read_bytes() == b"an earlier model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# --- export_onnx: thresholds and path --------------------------------------------------------------


def test_agreement_in_percent_is_refused(tmp_path: Path, qmlp: tuple, no_export: None) -> None:
    # Was: accepted silently (99.5 demands 100 % agreement).
    qmodel, x = qmlp
    with pytest.raises(
        ValueError, match=r"min_top1_agreement must be a fraction in \[0, 1\], got 99.5"
    ):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x, min_top1_agreement=99.5)


def test_nan_or_text_sqnr_threshold_is_refused(
    tmp_path: Path, qmlp: tuple, no_export: None
) -> None:
    # Was: NaN switched the SQNR check off silently; '30' failed deep inside with a bare TypeError.
    qmodel, x = qmlp
    with pytest.raises(ValueError, match="min_sqnr_db must be a finite number, got nan"):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x, min_sqnr_db=float("nan"))
    with pytest.raises(TypeError, match="min_sqnr_db must be a number, got str '30'"):
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x, min_sqnr_db="30")  # type: ignore[arg-type]


def test_path_of_the_wrong_type_or_under_a_file(
    tmp_path: Path, qmlp: tuple, no_export: None
) -> None:
    # Was: "expected str, bytes or os.PathLike object, not NoneType"; "the folder ... does not exist".
    qmodel, x = qmlp
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got NoneType"):
        eq.export_onnx(qmodel, None, x)  # type: ignore[arg-type]
    (tmp_path / "notes").write_text("x")
    with pytest.raises(ValueError, match=r"notes', the folder of path, is a file, not a folder"):
        eq.export_onnx(qmodel, tmp_path / "notes" / "m.onnx", x)


def test_export_keeps_the_callers_training_flags(tmp_path: Path, qmlp: tuple) -> None:
    # Was: export_onnx left the caller's model in eval mode (STYLE §9).
    qmodel, x = qmlp
    qmodel.train()
    try:
        eq.export_onnx(qmodel, tmp_path / "m.onnx", x)
        assert all(m.training for m in qmodel.modules())
    finally:
        qmodel.eval()


# --- run_integer --------------------------------------------------------------------------------


def _relu_graph(path: Path) -> None:
    """x (N, 4) -> Q -> DQ -> Relu -> Q -> DQ -> y."""
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Relu", ["xd"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [s, z],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


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
    _relu_graph(path)
    assert eq.run_integer(path, np.ones((3, 4), np.float32)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"input 'x' has shape \(2, 5\); the model takes \(N, 4\)"):
        eq.run_integer(path, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"input 'x' has shape \(4,\); the model takes \(N, 4\)"):
        eq.run_integer(path, np.zeros(4, np.float32))


def test_run_integer_refuses_an_empty_batch(tmp_path: Path) -> None:
    # Was: IndexError "list index out of range".
    path = tmp_path / "relu.onnx"
    _relu_graph(path)
    with pytest.raises(ValueError, match=r"inputs hold an empty batch: \[\(0, 4\)\]"):
        eq.run_integer(path, np.zeros((0, 4), np.float32))


def test_run_integer_names_the_keys_given(tmp_path: Path) -> None:
    # Was: "no value for the model's inputs ['x']; it takes ['x']" (not the keys given), and
    # batch_size=True taken as 1.
    path = tmp_path / "relu.onnx"
    _relu_graph(path)
    with pytest.raises(ValueError, match=r"it takes \['x'\], got \['input'\]"):
        eq.run_integer(path, {"input": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match="batch_size must be a positive int, got True"):
        eq.run_integer(path, np.zeros((2, 4), np.float32), batch_size=True)
