"""QAT models export with eq.export_onnx and pass the same verification as PTQ models."""

from __future__ import annotations

import pytest
import torch

import edgequant as eq
from edgequant.export.inspect import inspect_onnx
from edgequant.qat import finalize, fit_qat, prepare_qat


@pytest.mark.parametrize("preset", ["w8a8", "w4a4"])
def test_trained_qat_model_exports_and_verifies(tiny_model, calib, train_data, tmp_path, preset):
    qat = prepare_qat(tiny_model, preset, calib, start="calibrated")
    # select="last": the trained grids are exported whether or not they beat the start.
    fit_qat(
        qat,
        train_data,
        epochs=2,
        lr=5e-3,
        teacher=tiny_model,
        kd_weight=0.5,
        progress=False,
        select="last",
    )
    scales = {n: p.detach().clone() for n, p in qat.named_parameters() if "learned_scale" in n}
    start = prepare_qat(tiny_model, preset, calib, start="calibrated")
    learned = dict(start.named_parameters())
    assert any(not torch.equal(scales[n], learned[n]) for n in scales)  # the grids trained
    info = eq.export_onnx(qat, tmp_path / "qat.onnx", calib[0][:2], verify_data=calib)
    assert info.verification.passed and info.verification.top1_agreement >= 0.995
    report = inspect_onnx(tmp_path / "qat.onnx")
    if preset == "w4a4":
        assert report.initializer_bytes.get("INT4", 0) > 0  # packed, two weights a byte
    else:
        assert (
            report.initializer_bytes.get("UINT8", 0) > 0 and "INT4" not in report.initializer_bytes
        )
    # The finalized (plain PTQ-form) model exports to the same graph computing the same numbers.
    final = finalize(qat)
    info2 = eq.export_onnx(final, tmp_path / "final.onnx", calib[0][:2], verify_data=calib)
    assert info2.verification.passed
    assert info2.size_bytes == info.size_bytes
    import onnxruntime as ort

    a = ort.InferenceSession(str(tmp_path / "qat.onnx")).run(None, {"x": calib[1].numpy()})[0]
    b = ort.InferenceSession(str(tmp_path / "final.onnx")).run(None, {"x": calib[1].numpy()})[0]
    assert (a == b).all()


@pytest.mark.parametrize("target", [None, "mcu-int8"])
def test_qat_through_the_option_a_join_exports_per_target(
    tiny_model, calib, train_data, tmp_path, target, sgd_steps
):
    """The slice-and-pad join of the tiny net (ResNet-20's option-A shortcut) after QAT steps:
    the default grids and the fully integer target (dsp-pow2: test_prepare.py's pow2 test)."""
    import onnx

    recipe = eq.Recipe.preset("w8a8")
    if target is not None:
        recipe = recipe.for_target(target)
    assert tiny_model.slice_join
    qat = prepare_qat(tiny_model, recipe, calib, start="calibrated")
    sgd_steps(qat, train_data)
    qat.eval()
    info = eq.export_onnx(qat, tmp_path / "qat.onnx", calib[0][:2], verify_data=calib)
    assert info.verification.passed
    assert info.fully_integer is (True if target == "mcu-int8" else None)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "qat.onnx")).graph.node}
    assert {"Slice", "Pad", "Add"} <= ops
