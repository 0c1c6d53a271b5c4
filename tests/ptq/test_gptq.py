"""GPTQ (ptq/gptq.py): its rounding against round-to-nearest, its Hessian against im2col, and the
clipping search it runs below 4 bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.modules import from_float
from edgequant.ptq.gptq import gptq_hessian, gptq_weight, search_clipping_
from edgequant.spec import weight_spec


def _nearest(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int):
    return (torch.clamp(torch.round(w / scale) + zp, qmin, qmax) - zp) * scale


def test_gptq_beats_nearest_on_correlated_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g)
    x = torch.randn(2048, 32, generator=g) @ mix  # correlated columns: where GPTQ helps
    w = torch.randn(16, 32, generator=g)
    scale = (w.abs().amax(dim=1, keepdim=True) / 7).expand_as(w)
    zp = torch.zeros_like(w)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    q_gptq = gptq_weight(w, h, scale, zp, -8, 7)
    q_near = _nearest(w, scale, zp, -8, 7)
    # On the grid: integers after dividing by the scale, inside [-8, 7].
    ints = (q_gptq / scale).round()
    assert torch.allclose(q_gptq / scale, ints, atol=1e-4)
    assert ints.min() >= -8 and ints.max() <= 7
    err_gptq = float(((x @ q_gptq.T) - (x @ w.T)).square().mean())
    err_near = float(((x @ q_near.T) - (x @ w.T)).square().mean())
    assert err_gptq < 0.7 * err_near


@pytest.mark.parametrize("bits", [2, 3])
def test_clipping_search_lowers_the_output_error_at_low_bits(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 32, generator=g) * torch.logspace(-1, 1, 32)  # unequal columns
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    recipe = eq.Recipe.preset(f"w{bits}a8").replace(
        rounding="nearest", bias_correction=False, first_last_bits=None
    )
    layer = eq.quantize(model, recipe, [x[:256]], method="static")[0]
    wq = layer.weight_quantizer
    h = 2 * x.double().T @ x.double() / x.shape[0]
    before = wq.scale.clone()

    def output_error(scale: torch.Tensor) -> float:
        s = scale.reshape(-1, 1).double()
        q = torch.clamp(torch.round(layer.weight.double() / s), wq.spec.qmin, wq.spec.qmax) * s
        e = layer.weight.double() - q
        return float(((e @ h) * e).sum())

    assert search_clipping_(layer, layer.weight, h)
    assert not torch.equal(wq.scale, before)
    assert output_error(wq.scale) < output_error(before)
    # The layer now quantizes on the searched grid.
    s = wq.scale.reshape(-1, 1)
    expected = torch.clamp(torch.round(layer.weight / s), wq.spec.qmin, wq.spec.qmax) * s
    assert torch.allclose(wq(layer.weight), expected)


def test_clipping_search_leaves_finer_or_constrained_grids_alone() -> None:
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    h = 2 * x.double().T @ x.double() / x.shape[0]
    for recipe in (
        eq.Recipe.preset("w4a8"),  # 4 bits: the MSE grid stays
        eq.Recipe.preset("w3a8").for_target("dsp-pow2"),  # power-of-two steps
    ):
        layer = eq.quantize(
            nn.Sequential(nn.Linear(32, 16)).eval(),
            recipe.replace(rounding="nearest", bias_correction=False, first_last_bits=None),
            [x],
            method="static",
        )[0]
        before = layer.weight_quantizer.scale.clone()
        assert not search_clipping_(layer, layer.weight, h)
        assert torch.equal(layer.weight_quantizer.scale, before)


def test_hessian_matches_im2col() -> None:
    layer = nn.Conv2d(2, 3, 3, padding=1)
    q = from_float(layer, weight_spec(4), None, "c")
    x = torch.randn(4, 2, 5, 5)
    h = gptq_hessian(q, [x])  # type: ignore[arg-type]
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18).double()
    assert torch.allclose(h, 2 * cols.T @ cols / cols.shape[0], rtol=1e-4, atol=1e-5)
