"""LSQ (qat/lsq.py): the step-size gradient of Esser et al. and the straight-through estimator,
and step sizes that stay positive."""

from __future__ import annotations

import math

import pytest
import torch

from edgequant.qat import prepare_qat
from edgequant.qat.lsq import LSQQuantizer, lsq_grad_scale


def test_lsq_gradient_is_esser_et_al(tiny_model, calib):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    q = qat.get_submodule("conv2").weight_quantizer
    assert isinstance(q, LSQQuantizer)
    w = qat.get_submodule("conv2").weight.detach().clone().requires_grad_(True)
    out = q(w)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    s = q.learned_scale.detach().reshape(-1, 1, 1, 1)
    v = w.detach() / s
    qmin, qmax = q.spec.qmin, q.spec.qmax
    # Clipped where round(v) leaves the grid, as PyTorch's learnable fake-quantize decides it
    # (with MSE ranges some weights sit in (qmax, qmax + 0.5), where v > qmax but round(v) = qmax).
    r = torch.round(v)
    d_scale = torch.where(r < qmin, float(qmin), torch.where(r > qmax, float(qmax), r - v))
    g = 1.0 / math.sqrt(w[0].numel() * qmax)
    assert g == pytest.approx(lsq_grad_scale(w, "weight", 0, None, qmax))
    expected = (upstream * d_scale).sum(dim=(1, 2, 3)) * g
    torch.testing.assert_close(q.learned_scale.grad, expected, rtol=1e-4, atol=1e-6)
    # Straight-through estimator: gradient 1 inside the grid, 0 where clipped.
    inside = (torch.round(v) >= qmin) & (torch.round(v) <= qmax)
    torch.testing.assert_close(w.grad, upstream * inside)


def test_scales_stay_positive(tiny_model, calib):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    q = qat.get_submodule("conv2").weight_quantizer
    with torch.no_grad():
        q.learned_scale.fill_(-1.0)
    w = qat.get_submodule("conv2").weight
    out = q(w)
    assert bool((q.scale == 1.0).all()) and torch.isfinite(out).all()
    with torch.no_grad():
        q.learned_scale.fill_(0.0)
    assert bool((q.scale > 0).all()) and torch.isfinite(q(w)).all()
