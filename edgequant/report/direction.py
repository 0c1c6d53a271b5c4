"""Which way a metric is better, and what "within tolerance of FP32" means for it.

A metric where higher is better (accuracy, a cosine similarity) takes `tolerance` as the largest
acceptable absolute drop: a run qualifies at metric >= FP32 - tolerance. A metric where lower is
better (perplexity, a loss) takes it as the largest acceptable relative rise: a run qualifies at
metric <= FP32 x (1 + tolerance), since perplexities of different models and texts differ by
orders of magnitude and only their ratio compares. The results file records the direction
(`lower_is_better`) and the rule (`tolerance_rule`); everything in report/ reads them from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgequant.metrics import LOWER_IS_BETTER

__all__ = [
    "default_lower_is_better",
    "gap_to_fp32",
    "is_lower_better",
    "limit",
    "limit_label",
    "tolerance_rule",
    "within",
]


def default_lower_is_better(metric: str) -> bool:
    """The direction of a metric by its name: True for the names in metrics.LOWER_IS_BETTER."""
    return metric in LOWER_IS_BETTER


def is_lower_better(results: Mapping[str, Any]) -> bool:
    """The direction a results dict records (results written before it was recorded, and any
    without it, are higher-is-better)."""
    return bool(results.get("lower_is_better", False))


def limit(base: float, tolerance: float, lower_is_better: bool) -> float:
    """The worst metric still within tolerance of FP32's `base`."""
    return base * (1.0 + tolerance) if lower_is_better else base - tolerance


def within(value: float, base: float, tolerance: float, lower_is_better: bool) -> bool:
    """Whether `value` is within tolerance of FP32's `base`, in the metric's direction."""
    bound = limit(base, tolerance, lower_is_better)
    return value <= bound if lower_is_better else value >= bound


def gap_to_fp32(base: float, value: float, lower_is_better: bool) -> float:
    """How much worse than FP32 `value` is, in the metric's units (positive: worse)."""
    return value - base if lower_is_better else base - value


def tolerance_rule(tolerance: float, lower_is_better: bool) -> str:
    """The rule in words, for reports and the recommendation."""
    if lower_is_better:
        return f"at most {1 + tolerance:g}x FP32; lower is better"
    return f"at most {tolerance:g} below FP32; higher is better"


def limit_label(tolerance: float, lower_is_better: bool) -> str:
    """A short legend entry for the tolerance line or band in plots."""
    return f"FP32 x {1 + tolerance:g}" if lower_is_better else f"FP32 - {tolerance:g}"
