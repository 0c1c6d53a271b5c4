"""Issue 27: the defaults pick the pipeline by the model. Dynamic and round-to-nearest
weight-only quantization run without calibration data; where calibration data shows Linear
inputs with outlier channels (ptq/outliers.py outlier_ratio > OUTLIER_RATIO), the default recipe
splits and smooths those inputs and refines the 8-bit weights (GPTQ, bias correction), and
quant_info["pipeline"] and the summary say why. Models without outliers are unaffected."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import SeededMLP  # tests/toys.py

import edgequant as eq
from edgequant.functional import sqnr_db
from edgequant.ptq import outliers

OUTLIER = 3  # the input channel with the injected outlier


def outlier_mlp() -> SeededMLP:
    """fc1 reads an input whose channel OUTLIER is 60x the others with a small weight (it
    carries range, not signal, as in trained transformers)."""
    model = SeededMLP().eval()
    with torch.no_grad():
        model.fc1.weight[:, OUTLIER] /= 60.0
    return model


def data(seed: int, outlier: bool = True, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(64, 32, generator=g)
        if outlier:
            x[:, OUTLIER] *= 60.0
        out.append(x)
    return out


CALIB, EVAL = data(0), data(1)
PLAIN = eq.Recipe.preset("w8a8").replace(smooth_alpha=None, split_outliers=None)


def outputs(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b) for b in batches])


def test_recipe_defaults_are_auto_and_round_trip() -> None:
    r = eq.Recipe.preset("w8a8")
    assert r.smooth_alpha == "auto" and r.split_outliers == "auto"
    assert eq.Recipe.from_yaml(r.to_yaml()) == r
    assert "outlier channels" in str(r)
    with pytest.raises(ValueError, match="split_outliers"):
        r.replace(split_outliers="always")


@pytest.mark.parametrize("method", ["dynamic", "weight_only"])
def test_no_calibration_data_needed(method: str) -> None:
    model = SeededMLP().eval()
    q = eq.quantize(model, "w8a8", method=method)
    info = q.quant_info
    assert info["samples_used"] == 0
    assert any("no calib_data" in why for why in info["pipeline"]["reasons"].values())
    assert any("no calib_data" in n for n in q.quant_summary.notes)
    clean = data(1, outlier=False)
    assert sqnr_db(outputs(model, clean), outputs(q, clean)) > 30.0


def test_no_data_needed_for_a_cnn_weight_only() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    q = eq.quantize(model.eval(), "w4-weight-only", method="weight_only")
    assert q.quant_info["pipeline"]["rounding"] == "nearest"
    assert any("BatchNorm not folded" in n for n in q.quant_summary.notes)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 10.0


@pytest.mark.parametrize(
    ("method", "change", "name"),
    [
        ("dynamic", {"smooth_alpha": 0.5}, "smooth_alpha"),
        ("dynamic", {"split_outliers": 0.9}, "split_outliers"),
        ("weight_only", {"rounding": "gptq"}, "rounding"),
        ("weight_only", {"bias_correction": True}, "bias_correction"),
    ],
)
def test_a_step_that_needs_data_says_so(method: str, change: dict, name: str) -> None:
    recipe = eq.Recipe.preset("w8a8").replace(**change)
    with pytest.raises(ValueError, match=rf"{name}=.*needs calib"):
        eq.quantize(SeededMLP().eval(), recipe, method=method)


def test_static_still_needs_data() -> None:
    with pytest.raises(ValueError, match="calib_data is required.*activation ranges"):
        eq.quantize(SeededMLP().eval(), "w8a8", method="static")


@pytest.fixture(scope="module")
def auto_static() -> nn.Module:
    return eq.quantize(outlier_mlp(), "w8a8", CALIB, method="static")


def test_static_default_finds_the_outlier_input_and_says_why(auto_static: nn.Module) -> None:
    pipeline = auto_static.quant_info["pipeline"]
    assert list(pipeline["outlier_inputs"]) == ["fc1"]  # fc2 reads ReLU outputs: no outliers
    assert pipeline["outlier_inputs"]["fc1"] > outliers.OUTLIER_RATIO
    assert pipeline["split_channels"]["fc1"] > 0 and pipeline["split_channels"]["fc2"] == 0
    assert pipeline["smooth_alphas"]["fc2"] is None
    assert pipeline["rounding"] == "gptq" and pipeline["bias_correction"] is True
    assert "outlier" in pipeline["reasons"]["rounding"]
    assert "outlier" in pipeline["reasons"]["bias_correction"]
    text = auto_static.quant_summary.format()
    assert "fc1: input max/median" in text and "split" in text


def test_a_fully_integer_target_gets_no_float_factors(tmp_path) -> None:
    """mcu-int8 runs a fully integer graph: "auto" leaves the outlier input unsplit and
    unsmoothed (their per-channel factors would be float ops), says why, and exports."""
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    qmodel = eq.quantize(outlier_mlp(), recipe, CALIB, method="static")
    pipeline = qmodel.quant_info["pipeline"]
    assert "fully integer" in pipeline["outliers"] and "split_channels" not in pipeline
    assert all(getattr(m, "input_smooth_inv", None) is None for m in qmodel.modules())
    info = eq.export_onnx(qmodel, tmp_path / "m.onnx", CALIB[0][:2], verify_data=CALIB)
    assert info.fully_integer


def test_static_default_beats_the_plain_pipeline_on_outliers(auto_static: nn.Module) -> None:
    model = outlier_mlp()
    ref = outputs(model, EVAL)
    plain = sqnr_db(ref, outputs(eq.quantize(model, PLAIN, CALIB, method="static"), EVAL))
    auto = sqnr_db(ref, outputs(auto_static, EVAL))
    assert auto > plain + 6.0, (plain, auto)


def test_explicit_settings_work_as_before() -> None:
    """An explicit number splits and smooths every Linear input, outliers or not."""
    recipe = eq.Recipe.preset("w8a8").replace(smooth_alpha=0.5, split_outliers=0.9)
    q = eq.quantize(outlier_mlp(), recipe, CALIB, method="static")
    pipeline = q.quant_info["pipeline"]
    assert pipeline["smooth_alphas"] == {"fc1": 0.5, "fc2": 0.5}
    assert pipeline["split_channels"]["fc2"] > 0


def test_dynamic_with_data_splits_and_smooths_the_outlier_input() -> None:
    model = outlier_mlp()
    ref = outputs(model, EVAL)
    auto = eq.quantize(model, "w8a8", CALIB, method="dynamic")
    plain = eq.quantize(model, PLAIN, CALIB, method="dynamic")
    pipeline = auto.quant_info["pipeline"]
    assert list(pipeline["outlier_inputs"]) == ["fc1"] and pipeline["split_channels"]["fc1"] > 0
    assert sqnr_db(ref, outputs(auto, EVAL)) > sqnr_db(ref, outputs(plain, EVAL)) + 3.0


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_a_model_without_outliers_is_unaffected(method: str) -> None:
    model = SeededMLP().eval()
    calib = data(0, outlier=False)
    auto = eq.quantize(model, "w8a8", calib, method=method)
    plain = eq.quantize(model, PLAIN, calib, method=method)
    pipeline = auto.quant_info["pipeline"]
    assert pipeline["outlier_inputs"] == {}
    assert not any(pipeline["split_channels"].values())
    assert not any(a is not None for a in pipeline["smooth_alphas"].values())
    if method == "static":
        assert pipeline["rounding"] == "nearest" and pipeline["bias_correction"] is False
    a, p = auto.state_dict(), plain.state_dict()
    assert a.keys() == p.keys()
    assert all(torch.equal(a[k], p[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert torch.equal(outputs(auto, EVAL), outputs(plain, EVAL))
