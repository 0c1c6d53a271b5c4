"""Quantization-aware training: prepare (from a PTQ start), fit (loop, distillation, freezing
schedule, checkpoints), DDP-synchronized ranges."""

from edgequant.qat.config import FitConfig
from edgequant.qat.fit import fit_qat
from edgequant.qat.prepare import RANGE_LEARNERS, finalize, freeze_observers, prepare_qat

__all__ = ["RANGE_LEARNERS", "FitConfig", "finalize", "fit_qat", "freeze_observers", "prepare_qat"]
