"""eq.mixed_precision and eq.mixed.plan: sensitivities -> integer program -> a Recipe."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from edgequant.mixed.allocate import (
    DEFAULT_CANDIDATES,
    FP32_BITS,
    Allocation,
    Budget,
    _check_candidates,
    _check_fixed,
    allocate,
    packed_bytes,
)
from edgequant.mixed.hawq import (
    float_instrumented,
    hessian_sensitivity,
    hessian_trace,
    pipeline_weight_error,
    spearman,
)
from edgequant.mixed.search import Trial, measure_drop, recipe_for, search
from edgequant.mixed.sensitivity import (
    EvalFn,
    LayerCosts,
    Sensitivity,
    base_recipe,
    collect_batches,
    eval_metric,
    layer_costs,
    quantize_uniform,
    sensitivity,
    uniform_recipe,
)
from edgequant.qat.prepare import check_float_model
from edgequant.recipe import Recipe

METHODS = ("perturbation", "hessian")


@dataclass
class MixedPlan:
    """A mixed-precision plan: the recipe to quantize with, and how it was chosen."""

    recipe: Recipe
    bits: dict[str, int]
    costs: LayerCosts
    sensitivity: Sensitivity
    method: str
    budget: Budget | None
    candidates: tuple[int, ...]
    solver_s: float = 0.0
    objective: float = 0.0
    other: Sensitivity | None = None
    spearman: dict[int, float] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)
    max_drop: float | None = None
    drop: float | None = None
    wall_s: float = 0.0
    qmodel: nn.Module | None = None
    # Seconds spent quantizing the model once per candidate width (eq.quantize, the PTQ pipeline)
    # before the sensitivities were measured.
    ptq_s: float = 0.0

    @property
    def packed_bytes(self) -> float:
        """Sum over layers of parameters x bits / 8 (what a bit-packing runtime stores)."""
        return packed_bytes(self.costs.params, self.bits)

    @property
    def fp32_bytes(self) -> float:
        return sum(self.costs.params.values()) * FP32_BITS / 8

    @property
    def average_bits(self) -> float:
        return FP32_BITS * self.packed_bytes / self.fp32_bytes

    @property
    def bops(self) -> float | None:
        act = self.recipe.activation.bits if self.recipe.activation is not None else None
        if act is None:
            return None
        return float(sum(self.costs.macs[n] * b * act for n, b in self.bits.items()))

    def table(self) -> str:
        """Per layer: parameters, MACs, chosen bits and the scores at every candidate."""
        names = list(self.bits)
        width = max(len(n) for n in names)
        heads = "".join(f"{'s@' + str(b):>11}" for b in self.candidates)
        lines = [
            f"mixed-precision plan ({self.method}): {self.average_bits:.3f} bits per weight on "
            f"average, {self.packed_bytes:,.0f} packed bytes ({self.packed_bytes / self.fp32_bytes:.4f} "
            f"of FP32), budget {self.budget}, solver {self.solver_s * 1e3:.1f} ms, "
            f"PTQ at each width {self.ptq_s:.1f} s, sensitivity {self.sensitivity.wall_s:.1f} s",
            f"  {'layer':<{width}} {'params':>8} {'MACs':>10} bits{heads}",
        ]
        for n in names:
            row = self.sensitivity.scores[n]
            cells = "".join(f"{row[b]:>11.3g}" for b in self.candidates)
            lines.append(
                f"  {n:<{width}} {self.costs.params[n]:>8} {self.costs.macs[n]:>10} "
                f"{self.bits[n]:>4}{cells}"
            )
        if self.spearman:
            rhos = ", ".join(f"{b} bits {r:.3f}" for b, r in sorted(self.spearman.items()))
            lines.append(f"  Spearman (perturbation vs Hessian rankings): {rhos}")
        if self.max_drop is not None and self.drop is not None:
            lines.append(
                f"  measured drop {self.drop:.4f} (tolerance {self.max_drop}) after "
                f"{len(self.trials)} trials"
            )
        lines.extend(f"  note: {n}" for n in self.sensitivity.notes)
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "method": self.method,
            "bits": dict(self.bits),
            "packed_bytes": self.packed_bytes,
            "fp32_bytes": self.fp32_bytes,
            "average_bits": self.average_bits,
            "budget": self.budget.as_dict() if self.budget else None,
            "solver_s": self.solver_s,
            "sensitivity_s": self.sensitivity.wall_s,
            "ptq_s": self.ptq_s,
            "scores": {
                n: {str(b): s for b, s in r.items()} for n, r in self.sensitivity.scores.items()
            },
            "spearman": {str(b): r for b, r in self.spearman.items()},
            "max_drop": self.max_drop,
            "drop": self.drop,
            "trials": [t.__dict__ for t in self.trials],
        }


def _sensitivities(
    model: nn.Module,
    batches: list[Any],
    cands: tuple[int, ...],
    base: Recipe,
    method: str,
    num_samples: int,
    compare: bool,
    hessian_samples: int,
    hessian_seconds: float,
    progress: bool,
) -> tuple[Sensitivity, Sensitivity | None, dict[int, float], float]:
    act_bits = base.activation.bits if base.activation is not None else None
    pert = hess = None
    start = time.perf_counter()
    quantized = quantize_uniform(model, batches, cands, base)
    ptq_s = time.perf_counter() - start
    if method == "perturbation" or compare:
        pert = sensitivity(
            model,
            batches,
            cands,
            act_bits,
            recipe=base,
            num_samples=num_samples,
            quantized=quantized,
            progress=progress,
        )
    if method == "hessian" or compare:
        trace = hessian_trace(
            model,
            batches,
            samples=hessian_samples,
            max_seconds=hessian_seconds,
            num_samples=num_samples,
            recipe=base,
        )
        hess = hessian_sensitivity(trace, pipeline_weight_error(quantized), cands)
    rhos: dict[int, float] = {}
    if pert is not None and hess is not None:
        rhos = {b: spearman(pert, hess, b) for b in cands}
    chosen = pert if method == "perturbation" else hess
    other = hess if method == "perturbation" else pert
    assert chosen is not None
    return chosen, other, rhos, ptq_s


def plan(
    model: nn.Module,
    calib_data: Iterable[Any],
    budget: Budget | None = None,
    eval_fn: EvalFn | None = None,
    candidates: Sequence[int] | None = None,
    method: str = "perturbation",
    act_bits: int | None = 8,
    recipe: Recipe | None = None,
    max_drop: float | None = None,
    num_samples: int = 256,
    fixed: Mapping[str, int] | None = None,
    latency_table: Mapping[str, Mapping[int, float]] | None = None,
    compare: bool = False,
    hessian_samples: int = 32,
    hessian_seconds: float = 60.0,
    search_steps: int = 7,
    sensitivities: Sensitivity | None = None,
    progress: bool = False,
) -> MixedPlan:
    """A mixed-precision plan for `model`: per-layer weight bits from `candidates`.

    Give `budget` (an eq.Budget) to minimize the total sensitivity under it, or `max_drop` with
    `eval_fn(model) -> float` (higher is better; measure it on held-out data) for the smallest
    packed size whose measured drop from FP32 is at most max_drop (a search over size budgets,
    each candidate quantized and measured: `search_steps` bisection trials, counting the largest
    and the smallest plan, plus one uniform plan per intermediate candidate width, smallest first,
    up to the first one that meets the tolerance); both: the smallest plan within the budget that
    meets the tolerance. method: "perturbation" (KL of the outputs, or eval_fn's drop, one layer
    quantized at a time) or "hessian" (HAWQ-v3: Hutchinson trace x weight error). compare=True
    computes both and their Spearman rank correlation per bit width. candidates: default
    (2, 3, 4, 8), or those of `sensitivities` when given. `sensitivities` reuses a
    result (plan.sensitivity of an earlier plan) instead of measuring again.
    """
    start = time.perf_counter()
    _check_plan_args(model, method, budget, max_drop, eval_fn, search_steps)
    fixed, cands = fixed_and_candidates(fixed, candidates, sensitivities)
    base = base_recipe(recipe, act_bits)
    batches = collect_batches(calib_data, max(num_samples, base.calib_samples), "calib_data")

    costs = layer_costs(float_instrumented(model, uniform_recipe(base, 8), batches[0]), batches[0])
    # Layers are scored by the output KL; eval_fn measures plans (one evaluation each), not every
    # (layer, width) pair: that would cost layers x widths evaluations of a coarser metric.
    other: Sensitivity | None = None
    rhos: dict[int, float] = {}
    ptq_s = 0.0
    if sensitivities is not None:
        sens, method = sensitivities, sensitivities.method
    else:
        sens, other, rhos, ptq_s = _sensitivities(
            model, batches, cands, base, method, num_samples, compare, hessian_samples,
            hessian_seconds, progress,
        )  # fmt: skip
    missing = [n for n in costs.params if n not in sens.scores]
    if missing:
        raise RuntimeError(f"no sensitivity for layers {missing[:5]}")
    solve = _solver(sens, costs, cands, act_bits or 8, latency_table, fixed)
    alloc, drop, trials = _choose(
        model, base, costs, batches, eval_fn, max_drop, budget, solve, cands, search_steps
    )
    return MixedPlan(
        recipe=recipe_for(base, alloc.bits, costs.params),
        bits=alloc.bits,
        costs=costs,
        sensitivity=sens,
        method=method,
        budget=budget,
        candidates=cands,
        solver_s=alloc.solver_s,
        objective=alloc.objective,
        other=other,
        spearman=rhos,
        trials=trials,
        max_drop=max_drop,
        drop=drop,
        wall_s=time.perf_counter() - start,
        ptq_s=ptq_s,
    )


def _choose(
    model: nn.Module,
    base: Recipe,
    costs: LayerCosts,
    batches: list[Any],
    eval_fn: EvalFn | None,
    max_drop: float | None,
    budget: Budget | None,
    solve: Callable[..., Allocation],
    cands: tuple[int, ...],
    search_steps: int,
) -> tuple[Allocation, float | None, list[Trial]]:
    """The allocation under the budget (its drop measured when eval_fn is given), or with
    max_drop the search's smallest plan within it: (allocation, drop, trials)."""
    if max_drop is None:
        assert budget is not None
        alloc = solve(budget)
        drop = None
        if eval_fn is not None:
            drop = measure_drop(
                model,
                base,
                alloc.bits,
                costs.params,
                batches,
                eval_fn,
                eval_metric(eval_fn, model, "the FP32 model"),
            )
        return alloc, drop, []
    assert eval_fn is not None
    if budget is not None:
        # The search re-states the size bounds in bytes; an infeasible budget is named here
        # as the caller gave it (size_ratio stays size_ratio), before any plan is measured.
        solve(budget)
    return search(
        model, base, costs, batches, eval_fn, float(max_drop), budget, solve, cands, search_steps
    )


def _check_plan_args(
    model: nn.Module,
    method: str,
    budget: Budget | None,
    max_drop: float | None,
    eval_fn: EvalFn | None,
    search_steps: int,
) -> None:
    """plan's arguments, each named in its error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_float_model(model)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; valid: {', '.join(METHODS)}")
    if budget is None and max_drop is None:
        raise ValueError(
            "give budget= (an edgequant.Budget) or max_drop= with eval_fn= (accuracy-target mode)"
        )
    if budget is not None and not isinstance(budget, Budget):
        raise TypeError(f"budget must be an edgequant.Budget, got {type(budget).__name__}")
    if max_drop is not None:
        if eval_fn is None:
            raise ValueError("max_drop needs eval_fn(model) -> float to measure the drop")
        # `not >= 0` refuses NaN too: every drop compared false with it (the 8-bit plan came back).
        if (
            isinstance(max_drop, bool)
            or not isinstance(max_drop, (int, float))
            or not max_drop >= 0
        ):
            raise ValueError(f"max_drop must be a number >= 0, got {max_drop!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable (model -> float), got {type(eval_fn).__name__}")
    if isinstance(search_steps, bool) or not isinstance(search_steps, int) or search_steps < 1:
        raise ValueError(f"search_steps must be a positive int, got {search_steps!r}")


def fixed_and_candidates(
    fixed: Mapping[str, int] | None,
    candidates: Sequence[int] | None,
    sensitivities: Sensitivity | None,
) -> tuple[dict[str, int], tuple[int, ...]]:
    """The caller's pinned layers and the candidate widths, checked (those of `sensitivities`
    by default, which must be a Sensitivity and cover any given)."""
    if sensitivities is not None and not isinstance(sensitivities, Sensitivity):
        raise TypeError(
            f"sensitivities must be an edgequant.mixed.Sensitivity, got "
            f"{type(sensitivities).__name__}"
        )
    checked = _check_fixed(fixed)
    if candidates is None:
        candidates = sensitivities.candidates if sensitivities is not None else DEFAULT_CANDIDATES
    cands = _check_candidates(candidates)
    if sensitivities is not None:
        not_measured = sorted(set(cands) - set(sensitivities.candidates))
        if not_measured:
            raise ValueError(
                f"sensitivities were measured at {list(sensitivities.candidates)} bits, "
                f"not at {not_measured}: pass candidates within those, or measure again"
            )
    return checked, cands


def _solver(
    sens: Sensitivity,
    costs: LayerCosts,
    cands: tuple[int, ...],
    act_bits: int,
    latency_table: Mapping[str, Mapping[int, float]] | None,
    fixed: Mapping[str, int] | None,
) -> Callable[..., Allocation]:
    """solve(budget, uniform=None): the integer program's allocation under a budget; uniform:
    every layer at that width, except the caller's fixed layers."""

    def solve(b: Budget, uniform: int | None = None) -> Allocation:
        pinned = dict(fixed or {})
        if uniform is not None:
            pinned = {name: uniform for name in costs.params} | pinned
        return allocate(
            sens.scores,
            costs.params,
            b,
            cands,
            macs=costs.macs,
            act_bits=act_bits,
            latency_table=latency_table,
            fixed=pinned,
        )

    return solve


def mixed_precision(
    model: nn.Module,
    calib_data: Iterable[Any],
    budget: Budget | None = None,
    eval_fn: EvalFn | None = None,
    candidates: Sequence[int] | None = None,
    method: str = "perturbation",
    **kwargs: Any,
) -> Recipe:
    """A Recipe with one weight-bits override per layer, chosen under `budget` (or, with
    max_drop= and eval_fn, the smallest that keeps the metric within max_drop); see
    `edgequant.mixed.plan` for the arguments and for the plan's details."""
    return plan(model, calib_data, budget, eval_fn, candidates, method, **kwargs).recipe
