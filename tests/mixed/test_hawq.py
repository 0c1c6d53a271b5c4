"""HAWQ's sensitivity (mixed/hawq.py): the Hutchinson Hessian trace against an exact one, its
stopping rules, and the Hessian ranking beside the perturbation one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgequant.mixed import hessian_trace, spearman
from edgequant.mixed.hawq import hessian_sensitivity, pipeline_weight_error

LAYERS = ["conv1", "conv2", "conv3", "linear"]


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
