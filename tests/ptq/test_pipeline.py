"""The 4-bit PTQ pipeline: GPTQ and AdaRound rounding, cross-layer equalization, bias
correction, the per-layer "auto" calibrator, and how the recipe switches them and records them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant import functional as F
from edgequant.modules import QuantMixin
from edgequant.observers import AutoObserver
from edgequant.ptq.adaround import round_adaround
from edgequant.ptq.equalize import equalize, find_pairs
from edgequant.ptq.gptq import gptq_hessian, gptq_weight, search_clipping_
from edgequant.spec import activation_spec, weight_spec


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> pool -> linear, with badly balanced channels."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv1.weight.mul_(torch.logspace(-1, 1, 8).reshape(-1, 1, 1, 1))
            self.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            self.bn.running_var.uniform_(0.5, 2.0, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _data(n: int = 64, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, 8, 8, generator=g).split(16))


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


def _quantize(model: nn.Module, preset: str = "w4a8", **changes: object) -> nn.Module:
    recipe = eq.Recipe.preset(preset).replace(**changes)
    return eq.quantize(model, recipe, _data(), method="static")


def test_hessian_matches_im2col() -> None:
    layer = nn.Conv2d(2, 3, 3, padding=1)
    from edgequant.modules import from_float

    q = from_float(layer, weight_spec(4), None, "c")
    x = torch.randn(4, 2, 5, 5)
    h = gptq_hessian(q, [x])  # type: ignore[arg-type]
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18).double()
    assert torch.allclose(h, 2 * cols.T @ cols / cols.shape[0], rtol=1e-4, atol=1e-5)


def test_adaround_reconstructs_better_than_nearest() -> None:
    from edgequant.modules import from_float

    torch.manual_seed(0)
    layer = from_float(nn.Linear(32, 16), weight_spec(3), None, "fc")
    wq = layer.weight_quantizer
    wq.calibrate_tensor(layer.weight)
    wq.set_mode("quantize")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 32, generator=g) @ torch.randn(32, 32, generator=g)
    w_float = layer.weight.detach().clone()
    before = float((torch.nn.functional.linear(x, wq(w_float)) - x @ w_float.T).square().mean())
    round_adaround(layer, [x], iters=150)  # type: ignore[arg-type]
    w_new = layer.weight.detach()
    # The new weight is on the grid: the quantizer leaves it unchanged.
    assert torch.equal(wq(w_new), w_new)
    after = float((x @ w_new.T - x @ w_float.T).square().mean())
    assert after < before


def test_equalization_keeps_the_float_function_and_balances_ranges() -> None:
    model = Chain().eval()
    recipe = eq.Recipe.preset("w4a8")
    from edgequant.ptq.static import build_static

    qmodel, _, _ = build_static(model, recipe, _data()[0])
    assert ("conv1", "conv2") in find_pairs(qmodel)
    x = _data()[0]
    with torch.no_grad():
        before = qmodel(x)
        equalize(qmodel)
        after = qmodel(x)
    assert F.sqnr_db(before, after) > 80
    r1 = qmodel.conv1.weight.abs().reshape(8, -1).amax(1)
    r2 = qmodel.conv2.weight.abs().transpose(0, 1).reshape(8, -1).amax(1)
    assert torch.allclose(r1, r2, rtol=1e-4)


def test_bias_correction_restores_output_means() -> None:
    model = Chain().eval()
    data = _data()
    off = _quantize(model, "w3a8", rounding="nearest", bias_correction=False)
    on = _quantize(model, "w3a8", rounding="nearest", bias_correction=True)
    x = torch.cat(data)
    with torch.no_grad():
        ref = model(x).mean(0)
        err_off = float((off(x).mean(0) - ref).abs().mean())
        err_on = float((on(x).mean(0) - ref).abs().mean())
    assert err_on < err_off


def test_auto_observer_picks_the_lowest_error_candidate() -> None:
    spec = activation_spec(4, "auto")
    obs = AutoObserver(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[0, 0] = 40.0  # one outlier: minmax wastes the grid on it
    obs(x)
    lo, hi = obs.compute_range()
    assert obs.chosen != "minmax"
    assert obs.errors[obs.chosen] == min(obs.errors.values())
    # A scorer that only cares about the outlier makes minmax (which keeps it) the best.
    obs.score_fn = lambda s, sq: float((s[0, 0] - sq[0, 0]).abs())
    obs.compute_range()
    assert obs.chosen == "minmax"


def test_default_w4_pipeline_runs_and_is_recorded() -> None:
    model = Chain().eval()
    q = _quantize(model, "w4a8")
    pipeline = q.quant_info["pipeline"]
    assert pipeline["rounding"] == "gptq" and pipeline["bias_correction"] is True
    assert "gptq weight rounding" in pipeline["steps"]
    # At 8 bits the default is plain rounding.
    q8 = _quantize(model, "w8a8")
    assert q8.quant_info["pipeline"]["rounding"] == "nearest"
    assert q8.quant_info["pipeline"]["bias_correction"] is False


def test_every_step_can_be_switched_off() -> None:
    model = Chain().eval()
    q = _quantize(model, "w4a8", rounding="nearest", bias_correction=False, equalize=False)
    p = q.quant_info["pipeline"]
    assert p["steps"] == ["weight and activation ranges calibrated"]
    # Weights are then exactly round-to-nearest of the folded float weights.
    layer = q.get_submodule("conv2")
    assert isinstance(layer, QuantMixin)


@pytest.mark.parametrize("rounding", ["gptq", "adaround"])
def test_learned_rounding_improves_the_model_and_exports(
    rounding: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from edgequant.ptq import adaround
    from edgequant.ptq import static as R

    # Fewer AdaRound iterations keep the test fast; the method is the same.
    monkeypatch.setitem(
        R.ROUNDERS, "adaround", functools.partial(adaround.round_adaround, iters=150)
    )
    model = Chain().eval()
    x = torch.cat(_data(seed=7))
    with torch.no_grad():
        ref = model(x)
    near = _quantize(model, "w3a8", rounding="nearest", bias_correction=False)
    learned = _quantize(model, "w3a8", rounding=rounding, bias_correction=False)
    with torch.no_grad():
        err_near = float((near(x) - ref).square().mean())
        err_learned = float((learned(x) - ref).square().mean())
    assert err_learned < err_near
    info = eq.export_onnx(learned, tmp_path / "m.onnx", _data()[0])
    assert info.verification.passed and info.integer_weights >= info.quantized_layers


def test_recipe_fields_validate_and_round_trip() -> None:
    r = eq.Recipe.preset("w4a8").replace(rounding="adaround", equalize=True, bias_correction=False)
    assert eq.Recipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(ValueError, match="rounding"):
        eq.Recipe(rounding="stochastic")
    with pytest.raises(ValueError, match="equalize"):
        eq.Recipe(equalize="yes")  # type: ignore[arg-type]
