"""Perturbation sensitivity (mixed/sensitivity.py) on small models; the Hessian trace is tested in
test_hawq.py."""

from __future__ import annotations

import copy

import pytest
import torch

from edgequant.mixed import sensitivity
from edgequant.mixed.sensitivity import (
    Sensitivity,
    base_recipe,
    exact_pattern,
    uniform_recipe,
    with_layer_bits,
)
from edgequant.quantizer import quantizers

LAYERS = ["conv1", "conv2", "conv3", "linear"]


def test_every_layer_scored_at_every_width(pert: Sensitivity) -> None:
    assert list(pert.scores) == LAYERS
    assert all(sorted(row) == [2, 3, 4, 8] for row in pert.scores.values())
    assert pert.samples == 128
    # Everything float: the baseline is the FP32 model up to float rounding.
    assert max(pert.baseline.values()) < 1e-6


def test_fewer_bits_hurt_more(pert: Sensitivity) -> None:
    for name, row in pert.scores.items():
        assert row[2] > row[4] > row[8] >= -1e-7, name
        assert row[8] < 1e-3, name
    # At 2 bits the middle convolutions (5,120 weights each) matter more than the 10-way head.
    assert pert.scores["conv2"][2] > pert.scores["linear"][2]


def test_quantized_models_and_the_caller_model_are_left_as_they_were(
    cnn, calib, uniform, gptq_recipe
) -> None:
    before = copy.deepcopy(cnn.state_dict())
    q2 = uniform.models[2]
    modes = [q.mode for q in quantizers(q2)]
    weights = {k: v.clone() for k, v in q2.state_dict().items() if k.endswith(("weight", "bias"))}
    sensitivity(
        cnn, calib, candidates=(2, 8), num_samples=64, quantized=uniform, recipe=gptq_recipe
    )
    assert [q.mode for q in quantizers(q2)] == modes
    for k, v in q2.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_eval_fn_scores_the_metric_drop(cnn, calib, uniform, val_acc, gptq_recipe) -> None:
    s = sensitivity(
        cnn, calib, candidates=(2, 8), eval_fn=val_acc, quantized=uniform, recipe=gptq_recipe
    )
    assert "eval_fn" in s.metric
    for row in s.scores.values():
        assert abs(row[8]) <= 0.01  # 8-bit weights of one layer: within 5 of 500 signals
    assert max(row[2] for row in s.scores.values()) > 0.02


def test_bad_arguments(cnn, calib) -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sensitivity("model", calib)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="eval_fn must be callable"):
        sensitivity(cnn, calib, eval_fn=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidate bit width 1"):
        sensitivity(cnn, calib, candidates=(1, 8))
    with pytest.raises(ValueError, match="calib_data is empty"):
        sensitivity(cnn, [])
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        sensitivity(cnn, calib, num_samples=0)


def test_exact_pattern_matches_only_that_name() -> None:
    import fnmatch

    for name in ["layer1.0.conv1", "blocks[0].fc", "a*b", "q?"]:
        pattern = exact_pattern(name)
        assert fnmatch.fnmatchcase(name, pattern)
    assert not fnmatch.fnmatchcase("a_b", exact_pattern("a*b"))
    assert not fnmatch.fnmatchcase("qx", exact_pattern("q?"))


def test_plan_layers_get_the_presets_range_observer_at_their_width() -> None:
    """A plan on the default W8 (min/max) base puts its sub-8-bit layers on MSE grids, as the
    uniform presets at those widths are; an observer the caller chose is kept."""
    import edgequant as eq

    base = base_recipe(None, 8)
    plan = with_layer_bits(base, {"a": 2, "b": 4, "c": 8}, "plan")
    observers = {o.pattern: o.weight.observer for o in plan.overrides if o.weight is not None}
    assert observers == {"a": "mse", "b": "mse", "c": "minmax"}
    assert uniform_recipe(base, 3).weight == eq.Recipe.preset("w3a8").weight
    custom = base.replace(weight=base.weight.replace(observer="percentile"))
    kept = with_layer_bits(custom, {"a": 2}, "plan").overrides[0].weight
    assert kept is not None and (kept.bits, kept.observer) == (2, "percentile")
