"""qat/oscillation.py: the dampening loss is the mean squared distance of the weights from their
grid points, in steps; it settles the weights in their bins; its arguments are checked."""

from __future__ import annotations

import pytest
import torch
from toys import fit_fixed_adam  # tests/toys.py

from edgequant import functional as F
from edgequant.qat import fit_qat, prepare_qat
from edgequant.qat.base import QATQuantizer
from edgequant.qat.prepare import qat_quantizers


def test_dampening_loss_measures_the_distance_from_the_grid_in_steps(tiny_model, calib):
    from edgequant.qat.oscillation import dampening_loss

    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    layers = [
        m for m in qat.modules() if isinstance(getattr(m, "weight_quantizer", None), QATQuantizer)
    ]
    assert layers
    with torch.no_grad():
        for m in layers:
            q = m.weight_quantizer
            scale, zp = q.qparams()
            s = F.broadcast_param(scale.float(), m.weight, q.axis, q.spec.group_size)
            z = F.broadcast_param(zp.float(), m.weight, q.axis, q.spec.group_size)
            # Every weight on a grid point inside the range: nothing to dampen.
            grid = torch.randint_like(m.weight, q.spec.qmin + 1, q.spec.qmax)  # inside the ends
            m.weight.copy_((grid - z) * s)
    assert _mean_step_distance(qat) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        for m in layers:
            q = m.weight_quantizer
            scale, zp = q.qparams()
            s = F.broadcast_param(scale.float(), m.weight, q.axis, q.spec.group_size)
            m.weight.add_(0.25 * s)  # a quarter of a step off its grid point
    assert _mean_step_distance(qat) == pytest.approx(0.0625, rel=1e-4)
    # A weight beyond the range is clipped to the end of the grid first: it counts for nothing.
    first = layers[0]
    q = first.weight_quantizer
    scale, zp = q.qparams()
    s = F.broadcast_param(scale.float(), first.weight, q.axis, q.spec.group_size)
    z = F.broadcast_param(zp.float(), first.weight, q.axis, q.spec.group_size)
    with torch.no_grad():
        first.weight.copy_((q.spec.qmax - z + 7.3) * s)
    n_first = first.weight.numel()
    n_all = sum(m.weight.numel() for m in layers)
    assert _mean_step_distance(qat) == pytest.approx(0.0625 * (n_all - n_first) / n_all, rel=1e-4)
    # Its gradient pulls each weight towards its grid point; the ranges get none.
    for m in layers[1:]:
        m.weight.grad = None
    dampening_loss(qat).backward()
    assert all((m.weight.grad > 0).all() for m in layers[1:])
    assert all(p.grad is None for q in qat_quantizers(qat) for p in q.parameters())


def _mean_step_distance(qat: torch.nn.Module) -> float:
    from edgequant.qat.oscillation import dampening_loss

    with torch.no_grad():
        return float(dampening_loss(qat))


def test_dampening_settles_the_weights_in_their_bins(tiny_model, calib, make_data):
    x, y = make_data(320, 3)
    data = list(zip(x.split(32), y.split(32), strict=True))
    runs = {}
    for weight in (0.0, 10.0):
        qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
        history = fit_fixed_adam(qat, data, tiny_model, dampen_weight=weight, seed=3)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
        runs[weight] = _mean_step_distance(qat)
    # Adam moves every weight by about lr per step, so undampened latent weights end spread over
    # their bins (a mean squared distance near 1/12 of a step); dampened ones near the centres.
    assert runs[10.0] < 0.5 * runs[0.0], runs


def test_dampening_arguments_are_checked(tiny_model, calib, train_data):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="dampen_weight must be"):
            fit_qat(qat, train_data, dampen_weight=bad, progress=False)  # type: ignore[arg-type]
    for p in qat.parameters():
        p.requires_grad_(False)
    for q in qat_quantizers(qat):
        if q.role != "weight":
            for p in q.parameters():
                p.requires_grad_(True)
    with pytest.raises(ValueError, match="no trained weight behind a QAT weight quantizer"):
        fit_qat(qat, train_data, dampen_weight=1.0, progress=False)
