"""The hybrid workflow: lower the precision of the least sensitive layers first, one step at a
time, while the measured metric stays within the tolerance; optionally finish with a short QAT.
In the spirit of Wu et al., "Integer Quantization for Deep Learning Inference" (2020), section
6.2 (partial quantization: quantize layers in order of sensitivity while the accuracy holds).

Each step moves one layer one candidate width down: the move that costs the least sensitivity
per byte saved. A move that breaks the tolerance is undone and that layer stays where it is.
Every accepted state is measured (eq.quantize with the plan's recipe, then eval_fn), so the final
plan meets the tolerance on the data eval_fn reads, not only by prediction.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

from torch import nn

from edgequant.mixed.allocate import packed_bytes
from edgequant.mixed.hawq import float_instrumented
from edgequant.mixed.plan import MixedPlan, fixed_and_candidates
from edgequant.mixed.search import Trial, recipe_for
from edgequant.mixed.sensitivity import (
    EvalFn,
    LayerCosts,
    Sensitivity,
    base_recipe,
    collect_batches,
    eval_metric,
    layer_costs,
    method_for,
    quantize_uniform,
    sensitivity,
    uniform_recipe,
)
from edgequant.ptq.quantize import quantize
from edgequant.qat import FitConfig, fit_qat, prepare_qat
from edgequant.qat.prepare import check_float_model
from edgequant.recipe import Recipe


def _length(data: Any) -> int | None:
    """len(data), or None where it has none (a generator, a DataLoader of an IterableDataset)."""
    try:
        return len(data) if isinstance(data, Sized) else None
    except TypeError:
        return None


def _check_qat_arguments(
    qat_epochs: int, train_data: Iterable[Any] | None, qat_kwargs: Mapping[str, Any] | None
) -> None:
    """The final QAT's arguments, checked before the search (minutes) rather than after it."""
    if qat_epochs == 0:
        given = ["train_data"] if train_data is not None else []
        given += ["qat_kwargs"] if qat_kwargs else []
        if given:
            raise ValueError(
                f"{' and '.join(given)} given but qat_epochs is 0, so no QAT runs: set "
                "qat_epochs > 0 to train the final plan, or leave them out"
            )
        return
    if train_data is None:
        raise ValueError("qat_epochs > 0 needs train_data (batches of (inputs, labels))")
    if _length(train_data) == 0:
        raise ValueError("train_data is empty: qat_epochs > 0 needs batches of (inputs, labels)")
    if qat_kwargs is None:
        return
    if not isinstance(qat_kwargs, Mapping):
        raise TypeError(
            f"qat_kwargs must be a mapping of edgequant.fit_qat arguments (e.g. {{'lr': 1e-4}}), "
            f"got {type(qat_kwargs).__name__}"
        )
    # progressive passes these itself: the model, the data, qat_epochs and the FP32 teacher.
    own = {"qmodel", "train_data", "epochs", "teacher"}
    named = [f.name for f in dataclasses.fields(FitConfig)]
    named += [n for n in inspect.signature(fit_qat).parameters if n not in ("config", "settings")]
    valid = [n for n in named if n not in own]
    for key in qat_kwargs:
        if key in own:
            raise ValueError(
                f"qat_kwargs[{key!r}] is set by progressive itself "
                "(epochs: qat_epochs=, train_data: train_data=, teacher: the FP32 model)"
            )
        if key not in valid:
            raise ValueError(
                f"qat_kwargs[{key!r}] is not an argument of edgequant.fit_qat; valid: "
                f"{', '.join(valid)}"
            )


def progressive(
    model: nn.Module,
    calib_data: Iterable[Any],
    eval_fn: EvalFn,
    max_drop: float,
    candidates: Sequence[int] | None = None,
    act_bits: int | None = 8,
    recipe: Recipe | None = None,
    sensitivities: Sensitivity | None = None,
    num_samples: int = 256,
    max_steps: int | None = None,
    fixed: Mapping[str, int] | None = None,
    qat_epochs: int = 0,
    train_data: Iterable[Any] | None = None,
    qat_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> MixedPlan:
    """Start with every layer at the widest candidate; lower layers one step at a time, least
    sensitive per byte first, while eval_fn(quantized) stays within max_drop of eval_fn(model).

    eval_fn(model) -> float: higher is better (e.g. held-out accuracy). `sensitivities`: reuse a
    perturbation/Hessian result (default: perturbation KL). max_steps bounds the measured moves.
    qat_epochs > 0: the final plan is trained with edgequant.prepare_qat / fit_qat on
    train_data (with the FP32 model as teacher); the plan's qmodel is the trained model and
    plan.drop its measured drop.
    """
    start = time.perf_counter()
    _check_progressive_args(model, eval_fn, max_drop, max_steps, qat_epochs)
    _check_qat_arguments(qat_epochs, train_data, qat_kwargs)  # before the search, not after it
    fixed, cands = fixed_and_candidates(fixed, candidates, sensitivities)
    base = base_recipe(recipe, act_bits)
    batches = collect_batches(calib_data, max(num_samples, base.calib_samples), "calib_data")
    costs = layer_costs(float_instrumented(model, uniform_recipe(base, 8), batches[0]), batches[0])
    sensitivities = _scored(
        model, batches, cands, base, act_bits, costs, fixed, sensitivities, num_samples, progress
    )
    scores = sensitivities.scores

    reference = eval_metric(eval_fn, model, "the FP32 model")

    def measure(bits: Mapping[str, int]) -> tuple[float, nn.Module]:
        qmodel = quantize(
            model, recipe_for(base, bits, costs.params), batches, method=method_for(base)
        )
        average = packed_bytes(costs.params, bits) * 8 / max(sum(costs.params.values()), 1)
        what = f"the plan at {average:.2f} bits per weight"
        return reference - eval_metric(eval_fn, qmodel, what), qmodel

    bits, drop, qmodel, trials = _descend(
        measure, scores, costs.params, cands, fixed, float(max_drop), max_steps
    )
    final_recipe = recipe_for(base, bits, costs.params)
    if qat_epochs > 0:
        assert train_data is not None  # _check_qat_arguments refused None
        qmodel = prepare_qat(model, final_recipe, calib_data=batches)
        fit_qat(qmodel, train_data, epochs=qat_epochs, teacher=model, **dict(qat_kwargs or {}))
        qmodel.eval()
        drop = reference - eval_metric(
            eval_fn, qmodel, f"the plan after {qat_epochs} epochs of QAT"
        )
    return MixedPlan(
        recipe=final_recipe,
        bits=bits,
        costs=costs,
        sensitivity=sensitivities,
        method="progressive" + (f"+qat{qat_epochs}" if qat_epochs else ""),
        budget=None,
        candidates=cands,
        trials=trials,
        max_drop=float(max_drop),
        drop=drop,
        wall_s=time.perf_counter() - start,
        qmodel=qmodel,
    )


def _scored(
    model: nn.Module,
    batches: list[Any],
    cands: tuple[int, ...],
    base: Recipe,
    act_bits: int | None,
    costs: LayerCosts,
    fixed: Mapping[str, int],
    sensitivities: Sensitivity | None,
    num_samples: int,
    progress: bool,
) -> Sensitivity:
    """The given sensitivities, or the perturbation KL measured now; checked against the
    quantized layers, the fixed ones and the candidates."""
    for name, b in fixed.items():
        if name not in costs.params:
            raise ValueError(f"fixed names layer {name!r}, which is not a quantized layer")
        if b not in cands:
            raise ValueError(f"fixed[{name!r}]={b} is not a candidate ({list(cands)})")
    if sensitivities is None:
        quantized = quantize_uniform(model, batches, cands, base)
        sensitivities = sensitivity(
            model, batches, cands, act_bits, recipe=base, num_samples=num_samples,
            quantized=quantized, progress=progress,
        )  # fmt: skip
    scores = sensitivities.scores
    absent = [n for n in costs.params if n not in scores or any(b not in scores[n] for b in cands)]
    if absent:
        raise ValueError(f"sensitivities lack layers or widths for {absent[:5]}")
    return sensitivities


def _check_progressive_args(
    model: nn.Module,
    eval_fn: EvalFn,
    max_drop: float,
    max_steps: int | None,
    qat_epochs: int,
) -> None:
    """progressive's arguments (those of the final QAT: _check_qat_arguments; sensitivities:
    plan.fixed_and_candidates), each named."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_float_model(model)
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable (model -> float), got {type(eval_fn).__name__}")
    # `not >= 0` refuses NaN too: every move compared false with it (8 bits everywhere came back).
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise ValueError(f"max_drop must be a number >= 0, got {max_drop!r}")
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    ):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
        raise ValueError(f"qat_epochs must be an int >= 0, got {qat_epochs!r}")


def _descend(
    measure: Callable[[Mapping[str, int]], tuple[float, nn.Module]],
    scores: Mapping[str, Mapping[int, float]],
    params: Mapping[str, int],
    cands: tuple[int, ...],
    fixed: Mapping[str, int],
    max_drop: float,
    max_steps: int | None,
) -> tuple[dict[str, int], float, nn.Module, list[Trial]]:
    """From every layer at the widest candidate, one layer one width down per step (the least
    sensitivity per byte saved), kept while measure(bits)'s drop <= max_drop, else that layer
    stays: (bits, drop, quantized model, trials)."""

    def trial(bits: Mapping[str, int], drop: float) -> Trial:
        return Trial(dict(bits), packed_bytes(params, bits), drop, drop <= max_drop, "progressive")

    bits = {n: fixed.get(n, cands[-1]) for n in params}
    drop, qmodel = measure(bits)
    trials = [trial(bits, drop)]
    if drop > max_drop:
        raise ValueError(
            f"max_drop={max_drop} is unreachable: with every layer at {cands[-1]} bits the metric "
            f"drops by {drop:.4f}"
        )
    frozen = set(fixed)
    steps = 0
    while max_steps is None or steps < max_steps:
        moves = []
        for n, b in bits.items():
            if n in frozen or b == cands[0]:
                continue
            lower = cands[cands.index(b) - 1]
            saved = params[n] * (b - lower) / 8
            moves.append(((scores[n][lower] - scores[n][b]) / saved, n, lower))
        if not moves:
            break
        _, name, lower = min(moves)
        trial_bits = {**bits, name: lower}
        d, q = measure(trial_bits)
        steps += 1
        trials.append(trial(trial_bits, d))
        if d <= max_drop:
            bits, drop, qmodel = trial_bits, d, q
        else:
            frozen.add(name)
    return bits, drop, qmodel, trials
