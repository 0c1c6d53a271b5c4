"""qat/optim.py: with lr_scaling="grid" every tensor's rate is lr times one step of its grid, so
one Adam step moves each parameter by that much. (How FitConfig resolves the rates:
qat/test_config.py; range_lr_scale, warm-up and the schedule inside fit_qat: qat/test_fit.py.)"""

from __future__ import annotations

import pytest
import torch

from edgequant.qat import fit_qat, prepare_qat
from edgequant.qat.config import FitConfig
from edgequant.qat.optim import OWN_GRID_LEVELS, build_optimizer, param_groups
from edgequant.qat.prepare import qat_quantizers


def _one_adam_step(qat: torch.nn.Module, cfg: FitConfig, x: torch.Tensor) -> dict[str, float]:
    """name -> the largest change of that parameter after one step of build_optimizer's
    optimizer on a squared-output loss (Adam's first step moves every element whose gradient
    is not zero by its group's rate)."""
    before = {n: p.detach().clone() for n, p in qat.named_parameters()}
    opt, _ = build_optimizer(qat, cfg)
    qat.train()
    loss = qat(x).pow(2).mean()
    loss.backward()
    opt.step()
    return {n: float((p.detach() - before[n]).abs().max()) for n, p in qat.named_parameters()}


def test_grid_rates_move_each_tensor_by_a_fixed_fraction_of_its_step(tiny_model, calib):
    qat = prepare_qat(tiny_model, "w2a2", calib, start="calibrated")
    steps = {
        name: float(m.weight_quantizer.scale.abs().mean())
        for name, m in qat.named_modules()
        if name and getattr(m, "weight_quantizer", None) is not None
    }
    sizes = {
        f"{qname}.{pname}": float(p.detach().abs().mean())
        for qname, q in qat.named_modules()
        if q in qat_quantizers(qat)
        for pname, p in q.named_parameters(recurse=False)
    }
    assert steps and sizes
    cfg = FitConfig().resolved()
    assert (cfg.lr_scaling, cfg.lr, cfg.range_lr_scale) == ("grid", 0.01, 0.1)
    moved = _one_adam_step(qat, cfg, calib[0])
    for layer, step in steps.items():
        # The 2-bit layers' steps are far larger than the 8-bit first and last layers'.
        assert moved[f"{layer}.weight"] == pytest.approx(0.01 * step, rel=1e-3), layer
    for name, size in sizes.items():
        assert moved[name] == pytest.approx(0.01 * 0.1 * size, rel=1e-3), name
    first, middle = steps["conv1"], steps["conv2"]
    assert middle > 10 * first  # 2 bits against 8: the rule is not a constant in disguise


def test_parameters_without_a_grid_move_on_an_8_bit_grid_of_their_own(tiny_model, calib):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    cfg = FitConfig(lr=0.02).resolved()
    biases = {n: p for n, p in qat.named_parameters() if n.endswith("bias")}
    assert biases
    rates = {id(p): g["lr"] for g in param_groups(qat, cfg) for p in g["params"]}
    for name, p in biases.items():
        expected = 0.02 * float(p.detach().abs().max()) / OWN_GRID_LEVELS
        assert rates[id(p)] == pytest.approx(expected), name


def test_lr_scaling_none_gives_every_weight_the_same_absolute_rate(tiny_model, calib):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    cfg = FitConfig(lr_scaling="none").resolved()
    assert (cfg.lr, cfg.range_lr_scale) == (1e-4, 1.0)
    groups = param_groups(qat, cfg)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1e-4)
    moved = _one_adam_step(qat, cfg, calib[0])
    for name, change in moved.items():
        if name.endswith("weight") and change > 0:
            assert change == pytest.approx(1e-4, rel=1e-3), name


def test_fit_qat_history_reports_the_lr_setting_not_a_group_rate(tiny_model, calib, train_data):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    history = fit_qat(qat, train_data, epochs=2, warmup_epochs=1, progress=False, select="last")
    assert history[0]["lr"] == pytest.approx(0.01)  # the peak, reached as the warm-up ends
    assert history[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_grid_default_moves_2_bit_weights_across_rounding_boundaries(tiny_model, calib, make_data):
    """What the rule is for: a 2-bit weight grid's step is large, and one absolute rate of 1e-4
    (the old default) leaves every integer weight where PTQ put it after a short run."""
    x, y = make_data(320, 3)
    data = list(zip(x.split(32), y.split(32), strict=True))
    changed = {}
    for scaling in ("grid", "none"):
        qat = prepare_qat(tiny_model, "w2a2", calib, start="calibrated")
        layer = qat.conv2
        # Measured on the starting grid, so only the weights' own moves count.
        step = layer.weight_quantizer.scale.detach().clone().view(-1, 1, 1, 1)
        codes = torch.round(layer.weight.detach() / step)
        fit_qat(
            qat,
            data,
            epochs=3,
            lr_scaling=scaling,
            teacher=tiny_model,
            progress=False,
            select="last",
        )
        changed[scaling] = float(
            (torch.round(layer.weight.detach() / step) != codes).float().mean()
        )
    print(changed)
    assert changed["grid"] > 5 * max(changed["none"], 0.002), changed
