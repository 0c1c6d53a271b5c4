"""PACT (qat/pact.py): the clipping level's gradient counts the clipped values."""

from __future__ import annotations

import pytest
import torch

import edgequant as eq
from edgequant.qat import prepare_qat
from edgequant.qat.pact import PACTQuantizer
from edgequant.quantizer import quantizers


def test_pact_gradient_counts_clipped_values(tiny_model, calib):
    qat = prepare_qat(
        tiny_model,
        eq.Recipe.preset("w4a4").replace(range_learning="pact"),
        calib,
        start="calibrated",
    )
    q = next(
        q for q in quantizers(qat) if isinstance(q, PACTQuantizer) and q.zero_point.item() == 0
    )
    alpha = float(q.alpha.detach())
    x = torch.linspace(-0.5 * alpha, 2 * alpha, 101, requires_grad=True)
    q(x).sum().backward()
    high = x.detach() / q.scale > q.spec.qmax + 0.5
    assert int(high.sum()) > 0
    assert float(q.alpha.grad) == pytest.approx(int(high.sum()), rel=1e-5)
    # Straight-through inside the grid, nothing where clipped.
    assert x.grad is not None
    low = x.detach() / q.scale < q.spec.qmin - 0.5
    assert torch.equal(x.grad, (~high & ~low).float())
