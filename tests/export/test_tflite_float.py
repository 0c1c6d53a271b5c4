"""export/tflite_float.py: the ops of a quantized model that would compute in float in a .tflite,
named with their layers before any conversion (export_tflite's refusal of a model quantized for a
target that is not fully integer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from zoo import ZOO  # tests/zoo.py

import edgequant as eq
import edgequant.export.tflite as tflite
from edgequant.export.pt2e import export_program, pt2e_model
from edgequant.export.tflite_float import float_ops


def _program(name: str, target: str) -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model, calib = ZOO[name]()
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target(target), calib)
    return export_program(pt2e_model(qmodel), (calib[0][:1],))


def test_float_logits_are_the_float_op_of_a_tflite_int8_model() -> None:
    """tflite-int8 keeps the logits in float: the last Linear is named; mcu-int8 quantizes that
    edge too, and nothing is float."""
    assert float_ops(_program("depthwise_separable", "tflite-int8")) == [
        "aten.linear (layer 'fc') writes the model's output in float"
    ]
    assert float_ops(_program("depthwise_separable", "mcu-int8")) == []


def test_a_float_edge_between_ops_names_both() -> None:
    """tflite-int8 leaves the upsampled tensor of a concatenation skip unquantized."""
    found = float_ops(_program("concat_upsample", "tflite-int8"))
    assert "aten.upsample_nearest2d (layer 'up') feeds aten.cat (the top level) in float" in found
    assert found[-1] == "aten.conv2d (layer 'head') writes the model's output in float"
    assert float_ops(_program("concat_upsample", "mcu-int8")) == []


def test_export_tflite_refuses_tflite_int8_naming_the_op_and_layer_before_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model, calib = ZOO["conv1d"]()
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target("tflite-int8"), calib)
    monkeypatch.setattr(tflite, "convert_program", lambda *_: pytest.fail("converted"))
    with pytest.raises(
        eq.ExportError,
        match=r"target 'tflite-int8', which leaves float ops .*: aten\.linear \(layer 'fc'\) "
        r"writes the model's output in float; quantize with recipe\.for_target\('mcu-int8'\)",
    ):
        eq.export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1])
    assert not list(tmp_path.iterdir())


def test_bilinear_upsampling_is_refused_before_conversion_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that reached export_tflite with bilinear upsampling (eq.quantize refuses it first
    for mcu-int8: bypassed here) is refused naming the op, the layer and why."""
    import importlib

    from torch import nn

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x))
            return self.head(torch.nn.functional.interpolate(y, scale_factor=2, mode="bilinear"))

    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    with pytest.raises(ValueError, match=r"op 'upsample \(bilinear\)'.*RESIZE_BILINEAR"):
        eq.quantize(Up().eval(), recipe, calib)
    quantize_module = importlib.import_module("edgequant.ptq.quantize")  # not the function
    monkeypatch.setattr(quantize_module, "require_target_fits", lambda *_: None)
    qmodel = eq.quantize(Up().eval(), recipe, calib)
    monkeypatch.setattr(tflite, "convert_program", lambda *_: pytest.fail("converted"))
    with pytest.raises(
        eq.ExportError,
        match=r"aten\.upsample_bilinear2d \(the top level\).*bilinear upsampling: TFLite has an "
        r"int8 RESIZE_BILINEAR",
    ):
        eq.export_tflite(qmodel, tmp_path / "u.tflite", calib[0][:1])
    assert not list(tmp_path.iterdir())
