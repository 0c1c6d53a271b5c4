"""qat/distill.py: distillation from a teacher without labels; feature distillation ties each
quantized layer's input to the teacher's, and its arguments are checked by name."""

from __future__ import annotations

import pytest
import torch
from toys import fit_fixed_adam  # tests/toys.py

from edgequant.qat import fit_qat, prepare_qat


def test_distillation_without_labels_learns_the_teacher(tiny_model, calib, make_data):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    x, _ = make_data(128, 9)
    inputs = list(x.split(32))
    history = fit_qat(qat, inputs, epochs=3, lr=1e-3, teacher=tiny_model, progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    assert not qat.training


def _feature_mismatch(qat: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    from edgequant.qat.distill import FeatureMatch, feature_layer_names

    match = FeatureMatch(qat, teacher, feature_layer_names(qat, teacher, None))
    match.capturing = True
    with torch.no_grad():
        teacher(x), qat.eval()(x)
    value = float(match.loss())
    match.remove()
    return value


def test_feature_distillation_ties_each_layer_input_to_the_teacher(tiny_model, calib, make_data):
    from edgequant.qat.distill import feature_layer_names

    x, _ = make_data(128, 9)
    inputs = list(x.split(32))
    probe = make_data(64, 11)[0]
    runs = {}
    for weight in (0.0, 10.0):
        qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
        assert feature_layer_names(qat, tiny_model, None) == ["conv1", "conv2", "conv3", "linear"]
        fit_fixed_adam(qat, inputs, tiny_model, feature_weight=weight)
        runs[weight] = _feature_mismatch(qat, tiny_model, probe)
        # The hooks are gone from both models once training ends.
        for module in (*qat.modules(), *tiny_model.modules()):
            assert not module._forward_pre_hooks
    assert runs[10.0] < 0.8 * runs[0.0], runs


def test_feature_distillation_arguments_are_checked(tiny_model, calib, train_data):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    with pytest.raises(ValueError, match="pass teacher="):
        fit_qat(qat, train_data, feature_weight=1.0, progress=False)
    with pytest.raises(ValueError, match="feature_weight must be"):
        fit_qat(qat, train_data, teacher=tiny_model, feature_weight=-1.0, progress=False)
    with pytest.raises(ValueError, match="feature_weight is 0"):
        fit_qat(qat, train_data, teacher=tiny_model, feature_layers=["conv2"], progress=False)
    with pytest.raises(ValueError, match="'conv9' is not a layer of the qmodel"):
        fit_qat(
            qat,
            train_data,
            teacher=tiny_model,
            feature_weight=1.0,
            feature_layers=["conv2", "conv9"],
            progress=False,
        )
    with pytest.raises(ValueError, match="non-empty list"):
        fit_qat(qat, train_data, teacher=tiny_model, feature_weight=1.0, feature_layers="conv2")
    # A teacher of another architecture shares no quantized layer's name.
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
    with pytest.raises(ValueError, match="none of the quantized layers' names"):
        fit_qat(qat, train_data, teacher=other, feature_weight=1.0, progress=False)
