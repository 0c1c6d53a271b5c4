"""The optimizer side of eq.fit_qat: parameter groups (learned ranges at their own rate, without
weight decay; with lr_scaling="grid" every tensor's rate in steps of its grid), the warm-up +
cosine schedule, and the moving average of the trained weights.

Why the grid: Adam normalises each gradient by its running magnitude, so it moves every
parameter by about its learning rate per step, whatever the parameter's size. One absolute rate
therefore means different things on different grids: 1e-4 is a ten-thousandth of a step of a
2-bit weight grid (step ~1) and cannot move a single weight across a rounding boundary in a
fine-tuning run, while it moves an 8-bit activation range (step ~0.01) by 1 % per step. Scaling
each tensor's rate by its step, like the layer-wise rates of LARS (You et al., "Large Batch
Training of Convolutional Networks", 2017) scale by the weight norm, makes lr the fraction of a
grid step a parameter moves per step, at every bit width and layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgequant.functional import SCALE_EPS
from edgequant.qat.config import FitConfig
from edgequant.qat.prepare import qat_quantizers
from edgequant.quantizer import TensorQuantizer


def steps_per_epoch(train_data: Iterable[Any]) -> int:
    """The number of batches per epoch, or 0 where train_data has no length."""
    try:
        return len(train_data)  # type: ignore[arg-type]
    except TypeError:
        return 0


# 8-bit per-tensor grid on which a parameter without a grid of its own (a bias, a norm's scale)
# measures its step under lr_scaling="grid".
OWN_GRID_LEVELS = 127.0


def _grid_step(p: torch.Tensor) -> float:
    """The step of an 8-bit per-tensor symmetric grid over p's own range (at least SCALE_EPS)."""
    return max(float(p.detach().abs().max()) / OWN_GRID_LEVELS, SCALE_EPS) if p.numel() else 1.0


def _weight_steps(model: nn.Module) -> dict[int, float]:
    """id(weight) -> the mean step of its quantizer's grid, for every quantized, trained weight."""
    steps: dict[int, float] = {}
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if (
            isinstance(quantizer, TensorQuantizer)
            and quantizer.mode == "quantize"
            and isinstance(weight, nn.Parameter)
        ):
            steps[id(weight)] = float(quantizer.scale.detach().abs().float().mean())
    return steps


def _range_step(name: str, p: torch.Tensor) -> float:
    """A learned range's own size: its mean magnitude (a step size, a clip), or one grid step
    for a zero point, which is counted in steps."""
    if "zero_point" in name:
        return 1.0
    return max(float(p.detach().abs().float().mean()), SCALE_EPS)


def param_groups(model: nn.Module, cfg: FitConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups. Learned ranges get no weight decay and lr *
    range_lr_scale. With lr_scaling="grid" every tensor's rate is also multiplied by the size of
    a step on its grid, one group per tensor: its quantizer's mean step (quantized weights), its
    own size (learned ranges), or the step of an 8-bit grid over its own range (the rest)."""
    ranges = {
        id(p): (name, p)
        for q in qat_quantizers(model)
        for name, p in q.named_parameters(recurse=False)
        if p.requires_grad
    }
    trained = [p for p in model.parameters() if p.requires_grad]
    scaling, lr, range_lr_scale = cfg.rates()
    if scaling == "none":
        return [
            {"params": [p for p in trained if id(p) not in ranges]},
            {
                "params": [p for p in trained if id(p) in ranges],
                "lr": lr * range_lr_scale,
                "weight_decay": 0.0,
            },
        ]
    weights = _weight_steps(model)
    groups: list[dict[str, Any]] = []
    for p in trained:
        if id(p) in ranges:
            name = ranges[id(p)][0]
            rate = lr * range_lr_scale * _range_step(name, p)
            groups.append({"params": [p], "lr": rate, "weight_decay": 0.0})
        else:
            step = weights.get(id(p))
            groups.append({"params": [p], "lr": lr * (step if step else _grid_step(p))})
    return groups


def build_optimizer(
    model: nn.Module, cfg: FitConfig
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """(the optimizer, the trained parameters in order); its groups are param_groups', its
    base rate cfg's lr as FitConfig.rates resolves it."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, cfg)
    lr = cfg.rates()[1]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay)
    return opt, trained


class Schedule:
    """Linear warm-up to lr over the first `warmup_epochs`, then a cosine to 0 at the last step;
    it steps once per batch where train_data has a length, else once per epoch."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: FitConfig, per_epoch: int) -> None:
        self.per_epoch = per_epoch
        self.per_step = per_epoch > 0
        self.total = cfg.epochs * per_epoch if self.per_step else cfg.epochs
        self.warm = (
            round(cfg.warmup_epochs * per_epoch) if self.per_step else math.ceil(cfg.warmup_epochs)
        )
        self.base_lr = cfg.rates()[1]
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warm:
            return (step + 1) / (self.warm + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - self.warm) / max(self.total - self.warm, 1)))

    def after_step(self) -> None:
        if self.per_step:
            self.sched.step()

    def after_epoch(self) -> None:
        if not self.per_step:
            self.sched.step()

    def steps_done(self, epoch: int, index: int) -> int:
        """Steps taken once batch `index` of `epoch` (1-based) is done (epochs where there is no
        length)."""
        return (epoch - 1) * self.per_epoch + index + 1 if self.per_step else epoch

    def last_lr(self) -> float:
        """The current lr setting (cfg.lr times the schedule's factor; a group's own rate is
        this times its grid step under lr_scaling="grid")."""
        return float(self.base_lr * self.factor(self.sched.last_epoch))


class WeightAverage:
    """An exponential moving average of the trained parameters (avg = d * avg + (1 - d) * p after
    each step, from the prepared model). STE training keeps moving weights that sit near a
    rounding boundary from one grid point to the next (Nagel et al. 2022), so the model at any
    one step is a noisy draw; the average is not. Between epochs the model holds the average
    (`swap_in`) and training goes on from the raw values (`restore`)."""

    def __init__(self, trained: list[nn.Parameter], decay: float) -> None:
        self.trained = trained
        self.decay = decay
        self.values = [p.detach().clone() for p in trained]

    def update(self) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(self.values, [p.detach() for p in self.trained], 1.0 - self.decay)

    def swap_in(self) -> list[torch.Tensor]:
        """Put the average into the model; return the raw values it replaced."""
        raw = [p.detach().clone() for p in self.trained]
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.trained], self.values)
        return raw

    def restore(self, raw: list[torch.Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.trained], raw)

    def resume(self, raw: list[torch.Tensor]) -> None:
        """A checkpoint's model holds the average and `raw` the training values: take both."""
        with torch.no_grad():
            for avg, p, value in zip(self.values, self.trained, raw, strict=True):
                avg.copy_(p)
                p.copy_(value)


__all__ = ["Schedule", "WeightAverage", "build_optimizer", "param_groups", "steps_per_epoch"]
