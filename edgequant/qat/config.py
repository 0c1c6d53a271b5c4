"""FitConfig: the settings of eq.fit_qat as data, checked in one place.

The defaults are the setting chosen on held-out data (BENCHMARKS.md, "QAT defaults"): Adam with
each tensor's learning rate in units of its own grid step (lr_scaling="grid", lr 0.01 of a step,
learned ranges at a tenth of that), no warm-up, the best held-out epoch kept.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OPTIMIZERS = ("sgd", "adam")
# lr_scaling: "grid" measures every tensor's learning rate in steps of its grid (qat/optim.py);
# "none" gives every tensor the same absolute rate.
LR_SCALINGS = ("grid", "none")
# What None resolves to, by lr_scaling: (lr, range_lr_scale).
RESOLVED_DEFAULTS = {"grid": (0.01, 0.1), "none": (1e-4, 1.0)}
# select="best" keeps the held-out best epoch, the start included; "last" the last epoch.
SELECTS = ("best", "last")


def _is_number_in(value: Any, low: float, high: float, low_open: bool = False) -> bool:
    """A real number (not a bool) in [low, high), or (low, high) with low_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (value > low if low_open else value >= low) and value < high


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class FitConfig:
    """How eq.fit_qat trains. Every field is checked when the config is made.

    epochs, lr, optimizer ("adam" | "sgd"), momentum (SGD), weight_decay: the optimizer; the
    learning rate follows a cosine to 0 over all steps, after a linear warm-up of
    `warmup_epochs` (fractions allowed where train_data has a length). lr_scaling: "grid" (the
    default with Adam) multiplies each tensor's rate by the size of one step of its grid, so lr
    is a fraction of a step: Adam moves every parameter by about its rate per step whatever
    the gradient, and the step that matters is 100x larger on a 2-bit grid than on an 8-bit
    one (qat/optim.py); "none" (the default with SGD) gives every tensor lr itself. lr: None
    takes 0.01 (grid) or 1e-4 (none). range_lr_scale: the learned ranges (LSQ step sizes and
    offsets, PACT clips) train at lr times this, without weight decay; None takes 0.1 (grid)
    or 1.0 (none). temperature, kd_weight: distillation from a teacher (kd_weight is the share
    of the distillation term where labels are given too). freeze_observers_epoch: EMA
    observers stop updating from this epoch. weight_average: decay of an exponential moving
    average of the trained parameters (0 = off); the model is left holding the average.
    feature_weight, feature_layers: a feature-distillation term on the inputs of these layers
    (default: every quantized layer). dampen_weight: the oscillation-dampening term
    (qat/oscillation.py). select: "best" keeps the held-out best epoch, the start included;
    "last" the last one. checkpoint_dir, resume: an atomic checkpoint after every epoch, and
    continuing from it. progress: a progress bar and a line per epoch. seed: the random state
    of training (data order, dropout).
    """

    epochs: int = 3
    lr: float | None = None
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    temperature: float = 4.0
    kd_weight: float = 1.0
    range_lr_scale: float | None = None
    lr_scaling: str | None = None
    warmup_epochs: float = 0.0
    freeze_observers_epoch: int | None = None
    weight_average: float = 0.0
    feature_weight: float = 0.0
    feature_layers: Sequence[str] | None = None
    dampen_weight: float = 0.0
    select: str = "best"
    checkpoint_dir: str | os.PathLike[str] | None = None
    resume: bool = False
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive_int("epochs", self.epochs)
        if self.lr is not None and not _is_number_in(self.lr, 0.0, math.inf, low_open=True):
            raise ValueError(f"lr must be a positive number or None, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        if self.lr_scaling is not None and self.lr_scaling not in LR_SCALINGS:
            raise ValueError(
                f"unknown lr_scaling {self.lr_scaling!r}; valid: {', '.join(LR_SCALINGS)} or None"
            )
        in_range = {
            "momentum": (self.momentum, 0.0, 1.0, "a number in [0, 1)"),
            "weight_decay": (self.weight_decay, 0.0, math.inf, "a finite number >= 0"),
            "range_lr_scale": (
                0.0 if self.range_lr_scale is None else self.range_lr_scale,
                0.0,
                math.inf,
                "a number >= 0 or None",
            ),
            "weight_average": (self.weight_average, 0.0, 1.0, "a number in [0, 1)"),
            "feature_weight": (self.feature_weight, 0.0, math.inf, "a number >= 0"),
            "dampen_weight": (self.dampen_weight, 0.0, math.inf, "a finite number >= 0"),
            "kd_weight": (self.kd_weight, 0.0, math.nextafter(1.0, math.inf), "a number in [0, 1]"),
        }
        for name, (value, low, high, what) in in_range.items():
            if not _is_number_in(value, low, high):
                raise ValueError(f"{name} must be {what}, got {value!r}")
        if not _is_number_in(self.temperature, 0.0, math.inf, low_open=True):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        if not _is_number_in(self.warmup_epochs, 0.0, self.epochs):
            raise ValueError(
                f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs!r}"
            )
        if self.feature_layers is not None and self.feature_weight == 0:
            raise ValueError(
                "feature_layers is given but feature_weight is 0: set feature_weight > 0"
            )
        if self.freeze_observers_epoch is not None:
            _check_positive_int("freeze_observers_epoch", self.freeze_observers_epoch)
        if not isinstance(self.resume, bool):
            raise TypeError(
                f"resume must be True or False, got {type(self.resume).__name__} "
                f"{self.resume!r}: pass checkpoint_dir=<folder> and resume=True"
            )
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if self.select not in SELECTS:
            raise ValueError(f"unknown select {self.select!r}; valid: {', '.join(SELECTS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def rates(self) -> tuple[str, float, float]:
        """(lr_scaling, lr, range_lr_scale) with None replaced by what it stands for:
        lr_scaling by the optimizer ("grid" with Adam, "none" with SGD), then lr and
        range_lr_scale by lr_scaling (RESOLVED_DEFAULTS)."""
        scaling = self.lr_scaling or ("grid" if self.optimizer == "adam" else "none")
        lr, range_lr_scale = RESOLVED_DEFAULTS[scaling]
        return (
            scaling,
            lr if self.lr is None else self.lr,
            range_lr_scale if self.range_lr_scale is None else self.range_lr_scale,
        )

    def resolved(self) -> FitConfig:
        """A copy whose None settings hold what they stand for (rates)."""
        scaling, lr, range_lr_scale = self.rates()
        return dataclasses.replace(self, lr_scaling=scaling, lr=lr, range_lr_scale=range_lr_scale)

    def replace(self, **settings: Any) -> FitConfig:
        """A copy with `settings` changed; an unknown name is refused with the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(
                f"unknown fit_qat setting(s) {', '.join(map(repr, unknown))}; valid: "
                f"{', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **settings)


__all__ = ["LR_SCALINGS", "OPTIMIZERS", "RESOLVED_DEFAULTS", "SELECTS", "FitConfig"]
