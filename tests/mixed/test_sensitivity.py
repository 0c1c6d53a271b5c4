"""Perturbation sensitivity and the Hutchinson Hessian trace on small models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgequant.mixed import hessian_trace, sensitivity, spearman
from edgequant.mixed.hawq import hessian_sensitivity, pipeline_weight_error
from edgequant.mixed.sensitivity import (
    Sensitivity,
    base_recipe,
    exact_pattern,
    quantize_uniform,
    uniform_recipe,
    with_layer_bits,
)
from edgequant.quantizer import quantizers

LAYERS = ["conv1", "conv2", "conv3", "linear"]


# 64 calibration samples keep GPTQ (the pipeline's rounding at <= 4 bits) quick.
RECIPE = base_recipe(None, 8).replace(calib_samples=64)


@pytest.fixture(scope="module")
def uniform(cnn, calib):
    return quantize_uniform(cnn, calib, (2, 3, 4, 8), RECIPE)


@pytest.fixture(scope="module")
def pert(cnn, calib, uniform) -> Sensitivity:
    return sensitivity(cnn, calib, num_samples=128, quantized=uniform, recipe=RECIPE)


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


def test_quantized_models_and_the_caller_model_are_left_as_they_were(cnn, calib, uniform) -> None:
    before = copy.deepcopy(cnn.state_dict())
    q2 = uniform.models[2]
    modes = [q.mode for q in quantizers(q2)]
    weights = {k: v.clone() for k, v in q2.state_dict().items() if k.endswith(("weight", "bias"))}
    sensitivity(cnn, calib, candidates=(2, 8), num_samples=64, quantized=uniform, recipe=RECIPE)
    assert [q.mode for q in quantizers(q2)] == modes
    for k, v in q2.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_eval_fn_scores_the_metric_drop(cnn, calib, uniform, val_acc) -> None:
    s = sensitivity(
        cnn, calib, candidates=(2, 8), eval_fn=val_acc, quantized=uniform, recipe=RECIPE
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


# --- Hessian ----------------------------------------------------------------------------------


def test_hutchinson_matches_the_exact_trace_of_a_linear_classifier() -> None:
    """On a softmax regression the Hessian of KL(p_FP32 || p(W)) at W_FP32 is computable
    exactly; the Hutchinson mean must land within 4 standard errors of its trace (Rademacher
    variance per vector: 2 x the squared off-diagonal entries)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    x = torch.randn(40, 6)
    n = 150
    trace = hessian_trace(model, [x], samples=n, max_seconds=60, num_samples=40, tol=0.0)
    assert trace.samples == n and trace.stopped_by == "samples"
    w0 = model[0].weight.detach().clone()
    b0 = model[0].bias.detach()
    ref = torch.log_softmax(x @ w0.T + b0, -1)

    def loss(w_flat: torch.Tensor) -> torch.Tensor:
        logq = torch.log_softmax(x @ w_flat.reshape(5, 6).T + b0, -1)
        return (ref.exp() * (ref - logq)).sum(-1).mean()

    h = torch.autograd.functional.hessian(loss, w0.flatten()).double()
    exact = float(h.diagonal().sum())
    off = float((h**2).sum() - (h.diagonal() ** 2).sum())
    stderr = (2 * off / n) ** 0.5
    assert exact > 0 and stderr < 0.2 * exact  # the check can fail: the bound is tight enough
    assert abs(trace.traces["0"] - exact) <= 4 * stderr


def test_hessian_trace_stops_on_time_and_counts(cnn, calib) -> None:
    t = hessian_trace(cnn, calib, samples=3, num_samples=64, tol=0.0)
    assert t.samples == 3 and t.images == 64
    assert set(t.traces) == set(LAYERS) and all(v > 0 for v in t.traces.values())
    t = hessian_trace(cnn, calib, samples=1000, max_seconds=1e-6, num_samples=64, tol=0.0)
    assert t.samples == 2 and t.stopped_by == "time"
    with pytest.raises(ValueError, match="samples must be a positive int"):
        hessian_trace(cnn, calib, samples=0)
    with pytest.raises(ValueError, match="max_seconds"):
        hessian_trace(cnn, calib, max_seconds=0)


def test_both_rankings_and_their_agreement(cnn, calib, uniform, pert) -> None:
    t = hessian_trace(cnn, calib, samples=8, num_samples=128, tol=0.0)
    hess = hessian_sensitivity(t, pipeline_weight_error(uniform), (2, 3, 4, 8))
    assert hess.method == "hessian" and list(hess.scores) == LAYERS
    for row in hess.scores.values():
        assert row[2] > row[4] > row[8] > 0
    rho = spearman(pert, hess, 2)
    assert -1.0 <= rho <= 1.0
    assert spearman(pert, pert, 2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not a candidate of both"):
        spearman(pert, hess, 5)
