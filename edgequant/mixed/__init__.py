"""Mixed precision: per-layer sensitivity (perturbation, Hessian trace), bit allocation under a
budget (an exact integer program), and the progressive PTQ-to-QAT workflow."""

from edgequant.mixed.allocate import Allocation, Budget, allocate
from edgequant.mixed.hawq import HessianTrace, hessian_sensitivity, hessian_trace, spearman
from edgequant.mixed.plan import MixedPlan, mixed_precision, plan
from edgequant.mixed.progressive import progressive
from edgequant.mixed.sensitivity import Sensitivity, layer_costs, sensitivity

__all__ = [
    "Allocation",
    "Budget",
    "HessianTrace",
    "MixedPlan",
    "Sensitivity",
    "allocate",
    "hessian_sensitivity",
    "hessian_trace",
    "layer_costs",
    "mixed_precision",
    "plan",
    "progressive",
    "sensitivity",
    "spearman",
]
