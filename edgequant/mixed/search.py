"""The accuracy-target search of mixed.plan: the smallest plan whose measured metric drop from
FP32 is within a tolerance, by bisection over size budgets (each trial quantized and measured)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from edgequant.mixed.allocate import FP32_BITS, Allocation, Budget, packed_bytes
from edgequant.mixed.sensitivity import (
    EvalFn,
    LayerCosts,
    eval_metric,
    method_for,
    with_layer_bits,
)
from edgequant.ptq.quantize import quantize
from edgequant.recipe import Recipe


@dataclass
class Trial:
    """One measured plan of a search: its bits, packed size and metric drop (eval_fn)."""

    bits: dict[str, int]
    packed_bytes: float
    drop: float
    accepted: bool
    # "bisection": the integer program's plan at a size budget; "uniform": every layer (but the
    # caller's fixed ones) at one candidate width; "progressive": a step of mixed.progressive.
    source: str = "bisection"


def recipe_for(base: Recipe, bits: Mapping[str, int], params: Mapping[str, int]) -> Recipe:
    """The mixed recipe: one exact-name override per layer, named after its average bits."""
    avg = FP32_BITS * packed_bytes(params, bits) / (sum(params[n] for n in bits) * FP32_BITS / 8)
    act = f"a{base.activation.bits}" if base.activation is not None else "-weight-only"
    return with_layer_bits(base, bits, f"mixed-w{avg:.2f}{act}")


def measure_drop(
    model: nn.Module,
    base: Recipe,
    bits: Mapping[str, int],
    params: Mapping[str, int],
    batches: list[Any],
    eval_fn: EvalFn,
    reference: float,
) -> float:
    qmodel = quantize(model, recipe_for(base, bits, params), batches, method=method_for(base))
    average = packed_bytes(params, bits) * 8 / max(sum(params.values()), 1)
    return reference - eval_metric(eval_fn, qmodel, f"the plan at {average:.2f} bits per weight")


def search(
    model: nn.Module,
    base: Recipe,
    costs: LayerCosts,
    batches: list[Any],
    eval_fn: EvalFn,
    max_drop: float,
    budget: Budget | None,
    solve: Any,
    cands: tuple[int, ...],
    steps: int,
) -> tuple[Allocation, float, list[Trial]]:
    """The smallest plan whose measured drop <= max_drop.

    Trials: the largest plan allowed, then the smallest; then each intermediate candidate width as
    a uniform plan, smallest first, up to the first accepted one, so that the search never returns
    a plan larger than a uniform width that meets the tolerance (per-layer sensitivities do not add
    up exactly, so a uniform plan the integer program would not choose can measure better); then
    `steps - 2` bisections of the packed size below the smallest accepted plan.
    """
    reference = eval_metric(eval_fn, model, "the FP32 model")
    total = sum(costs.params.values())
    trials: list[Trial] = []
    cap = float("inf")
    if budget is not None and budget.size_bytes is not None:
        cap = float(budget.size_bytes)
    if budget is not None and budget.size_ratio is not None:
        cap = min(cap, budget.size_ratio * total * FP32_BITS / 8)

    def bounded(size: float) -> Budget:
        if budget is None:
            return Budget(size_bytes=size)
        return Budget(size_bytes=size, bops=budget.bops, latency_ms=budget.latency_ms)

    def measured(alloc: Allocation, source: str) -> float:
        d = measure_drop(model, base, alloc.bits, costs.params, batches, eval_fn, reference)
        trials.append(Trial(dict(alloc.bits), alloc.packed_bytes, d, d <= max_drop, source))
        return d

    lo, hi = total * cands[0] / 8, min(total * cands[-1] / 8, cap)
    best = solve(bounded(hi))
    best_drop = measured(best, "bisection")
    if best_drop > max_drop:
        raise ValueError(
            f"max_drop={max_drop} is unreachable: the largest plan allowed "
            f"({best.average_bits:.2f} bits per weight) drops the metric by {best_drop:.4f}"
        )
    alloc = solve(bounded(lo))
    d = measured(alloc, "bisection")
    if d <= max_drop:
        return alloc, d, trials
    for width in cands[1:-1]:
        try:
            alloc = solve(bounded(best.packed_bytes), uniform=width)
        except ValueError:  # over the size, bops or latency budget: not a candidate
            continue
        if alloc.packed_bytes >= best.packed_bytes:
            continue
        d = measured(alloc, "uniform")
        if d <= max_drop:
            best, best_drop, hi = alloc, d, alloc.packed_bytes
            break
    for _ in range(max(steps - 2, 0)):
        mid = (lo + hi) / 2
        alloc = solve(bounded(mid))
        d = measured(alloc, "bisection")
        if d <= max_drop:
            hi = min(mid, alloc.packed_bytes)
            if alloc.packed_bytes <= best.packed_bytes:
                best, best_drop = alloc, d
        else:
            lo = mid
    return best, best_drop, trials
