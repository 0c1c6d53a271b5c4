"""export/verify.py: an exported file run in ONNX Runtime beside the simulation; it passes when
it agrees as well as the simulation agrees with itself under float rounding noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toys import relu_mlp, tensor_batches  # tests/toys.py

import edgequant as eq
from edgequant.export.lower import ExportError
from edgequant.export.verify import Comparison, ort_feed, verify_onnx

pytest.importorskip("onnxruntime")


def test_comparison_accumulates_sqnr_and_agreement_and_names_mismatches() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same = Comparison()
    same.add([ref], [ref.clone()], classify=True)
    assert same.sqnr_db == float("inf") and same.agreement == 1.0 and same.max_abs_err == 0.0
    off = Comparison()
    off.add([ref], [ref.flip(1)], classify=True)  # every row's top-1 swapped; noise = 2x signal
    assert off.agreement == 0.0 and off.sqnr_db == pytest.approx(-3.0103, abs=1e-3)
    with pytest.raises(ExportError, match="ONNX model has 2 outputs, the PyTorch model 1"):
        Comparison().add([ref], [ref, ref], classify=False)
    with pytest.raises(ExportError, match=r"output 0: ONNX Runtime gave shape \(2, 1\)"):
        Comparison().add([ref], [ref[:, :1]], classify=False)


def test_ort_feed_takes_keywords_by_name_and_positional_tensors_in_order() -> None:
    a, b = torch.zeros(1, 2), torch.ones(1, 3)
    assert set(ort_feed(["a", "b"], {"b": b, "a": a})) == {"a", "b"}
    assert ort_feed(["x", "y"], (a, b))["y"].shape == (1, 3)
    with pytest.raises(ExportError, match="no input for the ONNX model's input 'y'"):
        ort_feed(["x", "y"], a)


def test_a_file_that_computes_another_model_fails_with_the_reason(tmp_path: Path) -> None:
    calib = tensor_batches((8, 16), 3, 10)
    qmodel = eq.quantize(relu_mlp(16, 32, 4), "w8a8", calib)
    path = tmp_path / "m.onnx"
    eq.export_onnx(qmodel, path, calib[0])
    passed = verify_onnx(path, qmodel, calib)
    assert passed.passed and passed.samples == 24 and passed.reason == ""
    with torch.no_grad():
        qmodel.get_submodule("2").bias.add_(1.0)  # the simulation moves; the file does not
    failed = verify_onnx(path, qmodel, calib)
    assert not failed.passed and failed.reason.startswith("SQNR")
    with pytest.raises(ValueError, match="at least one batch"):
        verify_onnx(path, qmodel, [])
