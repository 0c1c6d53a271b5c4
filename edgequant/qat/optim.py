"""The optimizer side of eq.fit_qat: parameter groups (learned ranges at their own rate, without
weight decay), the warm-up + cosine schedule, and the moving average of the trained weights."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgequant.qat.config import FitConfig
from edgequant.qat.prepare import qat_quantizers


def steps_per_epoch(train_data: Iterable[Any]) -> int:
    """The number of batches per epoch, or 0 where train_data has no length."""
    try:
        return len(train_data)  # type: ignore[arg-type]
    except TypeError:
        return 0


def build_optimizer(
    model: nn.Module, cfg: FitConfig
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """(the optimizer, the trained parameters in order): the learned ranges (LSQ step sizes and
    offsets, PACT clips) train at lr * range_lr_scale and get no weight decay."""
    ranges = {id(p) for q in qat_quantizers(model) for p in q.parameters() if p.requires_grad}
    trained = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in trained if id(p) not in ranges]},
        {
            "params": [p for p in trained if id(p) in ranges],
            "lr": cfg.lr * cfg.range_lr_scale,
            "weight_decay": 0.0,
        },
    ]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
        return float(self.sched.get_last_lr()[0])


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


__all__ = ["Schedule", "WeightAverage", "build_optimizer", "steps_per_epoch"]
