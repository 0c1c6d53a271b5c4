"""TensorQuantizer: its modes against PyTorch's fake-quantize references, calibration_mode's
restore-on-error, and state_dict round trips into fresh (uncalibrated) quantizers and models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import bitwise_equal, gen  # tests/toys.py

import edgequant as eq
from edgequant import functional as F
from edgequant.graph_quantizers import place_graph_quantizers
from edgequant.instrument import instrument
from edgequant.quantizer import MODES, TensorQuantizer, calibration_mode, quantizers
from edgequant.spec import activation_spec, weight_spec

# --- modes --------------------------------------------------------------------------------------


def test_starts_disabled_and_passes_through() -> None:
    q = TensorQuantizer(activation_spec(8), "x")
    x = torch.randn(4, 5, generator=gen())
    assert q.mode == "disabled" and not q.calibrated
    assert q(x) is x


def test_observe_passes_through_and_records() -> None:
    q = TensorQuantizer(activation_spec(8), "x")
    q.set_mode("observe")
    x = torch.randn(4, 5, generator=gen())
    y = q(x)
    assert y is x
    q.compute_qparams()
    # minmax, asymmetric: the grid spans [min(x, 0), max(x, 0)] over 255 steps.
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert q.scale.shape == () and q.zero_point.dtype == torch.int32
    assert float(q.scale) == pytest.approx((hi - lo) / 255, rel=1e-6)


def test_quantize_before_calibration_raises() -> None:
    q = TensorQuantizer(activation_spec(8), "layer.input")
    with pytest.raises(RuntimeError, match="layer.input.*calibration"):
        q.set_mode("quantize")
    assert q.mode == "disabled"


def test_compute_qparams_without_data_names_the_layer() -> None:
    q = TensorQuantizer(activation_spec(8), "head.input")
    with pytest.raises(ValueError, match="head.input"):
        q.compute_qparams()


def test_unknown_mode_lists_valid_modes() -> None:
    q = TensorQuantizer(activation_spec(8), "x")
    with pytest.raises(ValueError) as info:
        q.set_mode("train")
    for mode in MODES:
        assert mode in str(info.value)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError, match="QuantSpec"):
        TensorQuantizer({"bits": 8}, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        TensorQuantizer(activation_spec(8), "x", role="bias")


def test_quantize_per_tensor_matches_pytorch_reference() -> None:
    q = TensorQuantizer(activation_spec(8), "x")
    calib = torch.randn(64, 16, generator=gen(1)) * 3 + 0.5
    q.calibrate_tensor(calib)
    q.set_mode("quantize")
    x = torch.randn(32, 16, generator=gen(2)) * 4  # also outside the calibrated range
    expected = torch.fake_quantize_per_tensor_affine(x, float(q.scale), int(q.zero_point), 0, 255)
    assert bitwise_equal(q(x), expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_per_channel_weight_matches_pytorch_reference(bits: int) -> None:
    q = TensorQuantizer(weight_spec(bits), "conv.weight", role="weight")
    w = torch.randn(6, 3, 3, 3, generator=gen(3)) * torch.linspace(0.1, 2.0, 6).reshape(6, 1, 1, 1)
    q.calibrate_tensor(w)
    q.set_mode("quantize")
    assert q.scale.shape == (6,)
    assert bool((q.zero_point == 0).all())  # symmetric
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    expected = torch.fake_quantize_per_channel_affine(w, q.scale, q.zero_point, 0, qmin, qmax)
    assert bitwise_equal(q(w), expected)
    # Every channel's largest magnitude lands within half a step of the grid's edge.
    steps = w.abs().amax(dim=(1, 2, 3)) / q.scale
    assert bool(((steps - qmax).abs() <= 1.0).all())


def test_dynamic_mode_takes_parameters_from_each_tensor() -> None:
    q = TensorQuantizer(activation_spec(8), "x")
    q.set_mode("dynamic")  # no calibration needed
    small = torch.randn(8, 4, generator=gen(4))
    large = small * 100
    y_small, y_large = q(small), q(large)
    assert torch.equal(y_small, F.dynamic_fake_quantize(small, 0, 255))
    # Same grid, rescaled: the error scales with the tensor (computed per call, nothing stored).
    err_small = (y_small - small).abs().max()
    err_large = (y_large - large).abs().max()
    assert float(err_large) > 10 * float(err_small)
    assert not q.calibrated


def test_observe_rejects_nan_with_the_quantizer_name() -> None:
    q = TensorQuantizer(activation_spec(8), "blocks.2.fc.input")
    q.set_mode("observe")
    with pytest.raises(ValueError, match=r"blocks\.2\.fc\.input"):
        q(torch.tensor([1.0, float("nan")]))


# --- calibration_mode ---------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _instrumented() -> nn.Module:
    x = torch.randn(4, 8, generator=gen(5))
    qmodel, _ = instrument(_net(), eq.Recipe.preset("w8a8"), x, "static")
    return qmodel


def test_calibration_mode_switches_activations_only_and_restores() -> None:
    qmodel = _instrumented()
    all_q = list(quantizers(qmodel))
    assert {q.role for q in all_q} == {"weight", "activation"}
    with calibration_mode(qmodel):
        assert all(q.mode == "observe" for q in all_q if q.role == "activation")
        assert all(q.mode == "disabled" for q in all_q if q.role == "weight")
        qmodel(torch.randn(4, 8, generator=gen(6)))
    assert all(q.mode == "disabled" for q in all_q)
    assert all(q.observer.batches == 1 for q in all_q if q.role == "activation")


def test_calibration_mode_restores_modes_when_the_body_raises() -> None:
    qmodel = _instrumented()
    all_q = list(quantizers(qmodel))
    for q in all_q:
        q.calibrate_tensor(
            torch.randn(16, 8, generator=gen(7))
            if q.role == "activation"
            else qmodel.get_submodule(q.name.rsplit(".", 1)[0]).weight
        )
    all_q[0].set_mode("quantize")
    all_q[1].set_mode("dynamic")
    before = [q.mode for q in all_q]
    with (
        pytest.raises(KeyError, match="boom"),
        calibration_mode(qmodel, which=("activation", "weight")),
    ):
        assert all(q.mode == "observe" for q in all_q)
        raise KeyError("boom")
    assert [q.mode for q in all_q] == before


# --- state_dict ---------------------------------------------------------------------------------


def test_state_dict_per_tensor_loads_into_a_fresh_quantizer() -> None:
    calibrated = TensorQuantizer(activation_spec(8), "x")
    calibrated.calibrate_tensor(torch.randn(32, 8, generator=gen(8)) + 1.0)
    calibrated.set_mode("quantize")
    fresh = TensorQuantizer(activation_spec(8), "x")
    assert fresh.scale.numel() == 0
    fresh.load_state_dict(calibrated.state_dict())
    assert fresh.calibrated
    assert bitwise_equal(fresh.scale, calibrated.scale)
    assert torch.equal(fresh.zero_point, calibrated.zero_point)
    assert fresh.zero_point.dtype == torch.int32
    fresh.set_mode("quantize")
    x = torch.randn(16, 8, generator=gen(9)) * 2
    assert bitwise_equal(fresh(x), calibrated(x))


def test_state_dict_per_channel_loads_into_a_fresh_quantizer() -> None:
    calibrated = TensorQuantizer(weight_spec(8), "fc.weight", role="weight")
    w = torch.randn(6, 10, generator=gen(10))
    calibrated.calibrate_tensor(w)
    calibrated.set_mode("quantize")
    fresh = TensorQuantizer(weight_spec(8), "fc.weight", role="weight")
    fresh.load_state_dict(calibrated.state_dict())
    assert fresh.scale.shape == (6,)
    assert bitwise_equal(fresh.scale, calibrated.scale)
    fresh.set_mode("quantize")
    assert bitwise_equal(fresh(w), calibrated(w))


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_model_state_dict_round_trip_gives_identical_outputs() -> None:
    model = _cnn()
    calib = [torch.randn(4, 3, 8, 8, generator=gen(11 + i)) for i in range(3)]
    qmodel = eq.quantize(model, "w8a8", calib)
    saved = qmodel.state_dict()
    recipe = eq.Recipe.preset("w8a8")
    fresh, summary = instrument(model, recipe, calib[0], "static")
    fresh = place_graph_quantizers(fresh, summary)
    assert all(q.scale.numel() == 0 for q in quantizers(fresh))
    fresh.load_state_dict(saved)
    for q_fresh, q_saved in zip(quantizers(fresh), quantizers(qmodel), strict=True):
        assert q_fresh.name == q_saved.name
        assert q_fresh.scale.shape == q_saved.scale.shape
        assert bitwise_equal(q_fresh.scale, q_saved.scale)
        assert torch.equal(q_fresh.zero_point, q_saved.zero_point)
        q_fresh.set_mode(q_saved.mode)
    x = torch.randn(8, 3, 8, 8, generator=gen(20))
    with torch.no_grad():
        assert bitwise_equal(fresh(x), qmodel(x))
