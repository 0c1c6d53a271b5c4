"""Per-layer Hessian trace by Hutchinson's estimator, and HAWQ-v3 sensitivities from it.
Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization", NeurIPS 2020, section 3.1
(Tr(H) = E[v^T H v] for Rademacher v); Yao et al., "HAWQ-V3", ICML 2021, eq. 6
(Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2).

The loss needs no labels: KL(p_FP32 || p_model) of the softmax outputs, with p_FP32 the model's
own predictions at its FP32 weights. Its gradient is zero there and its Hessian is the
generalized Gauss-Newton matrix of the softmax outputs (positive semi-definite, so every trace
is >= 0), which is what a second-order expansion of the output KL around FP32 needs: the same
quantity the perturbation route measures. A `loss_fn(outputs, reference_log_probs)` can replace it.

The traces are taken with respect to the BatchNorm-folded weights, the tensors that are
quantized. One Hessian-vector product covers every layer at once: v is drawn for all layers and
E[v_l^T (H v)_l] = Tr(H_ll) (the off-diagonal blocks average out).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from edgequant.batches import batch_size, call_model
from edgequant.instrument import instrument
from edgequant.mixed.sensitivity import (
    Sensitivity,
    UniformModels,
    _first_float_tensor,
    base_recipe,
    collect_batches,
    kl_to_reference,
    method_for,
    uniform_recipe,
)
from edgequant.modules import QuantMixin
from edgequant.quantizer import TensorQuantizer
from edgequant.recipe import Recipe

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class HessianTrace:
    """traces[layer]: estimated Tr(H) over that layer's (BN-folded) weights; params: their count."""

    traces: dict[str, float]
    params: dict[str, int]
    samples: int
    images: int
    wall_s: float
    relative_change: float
    stopped_by: str

    def average(self) -> dict[str, float]:
        """Tr(H) / n per layer (HAWQ-v2's average eigenvalue)."""
        return {n: t / self.params[n] for n, t in self.traces.items()}


def float_instrumented(model: nn.Module, recipe: Recipe, example_batch: Any) -> nn.Module:
    """An instrumented copy of `model` (BN folded, quantizers present but off): the float model
    in the coordinates the quantizers see."""
    method = method_for(recipe)
    qmodel, _ = instrument(model, recipe, example_batch, method=method)
    return qmodel.eval()


def hessian_trace(
    model: nn.Module,
    calib_data: Iterable[Any],
    loss_fn: LossFn | None = None,
    samples: int = 64,
    max_seconds: float = 60.0,
    num_samples: int = 256,
    tol: float = 0.02,
    seed: int = 0,
    recipe: Recipe | None = None,
) -> HessianTrace:
    """Hutchinson estimate of each quantizable layer's Hessian trace.

    Stops after `samples` Rademacher vectors, after `max_seconds` (checked between vectors, at
    least two vectors), or when the mean of the traces changed by less than `tol` (relative) over
    the last half of the vectors. Uses `num_samples` calibration samples per vector.
    loss_fn(outputs, reference_log_probs) -> scalar; default KL to the FP32 predictions (see module).
    """
    _check_trace_args(model, loss_fn, samples, max_seconds, num_samples)
    start = time.perf_counter()
    batches = collect_batches(calib_data, num_samples, "calib_data")
    base = uniform_recipe(base_recipe(recipe, 8), 8)
    fmodel = float_instrumented(model, base, batches[0])
    layers = {
        name: cast(QuantMixin, m)
        for name, m in fmodel.named_modules()
        if isinstance(m, QuantMixin) and m.weight_quantizer is not None
    }
    for p in fmodel.parameters():
        p.requires_grad_(False)
    weights = [layers[n].weight for n in layers]
    for w in weights:
        w.requires_grad_(True)
    with torch.no_grad():
        refs = [
            torch.log_softmax(_first_float_tensor(call_model(fmodel, b)).float(), -1)
            for b in batches
        ]
    total = sum(batch_size(b) for b in batches)
    loss_of: LossFn = loss_fn or (
        lambda out, ref: kl_to_reference(out, ref) / ref.reshape(-1, ref.shape[-1]).shape[0]
    )
    gen = torch.Generator().manual_seed(seed)
    sums = {n: 0.0 for n in layers}
    history: list[float] = []
    stopped_by = "samples"
    rel = float("inf")
    done = 0
    for i in range(samples):
        vs = [
            torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8).to(w.dtype) * 2 - 1
            for w in weights
        ]
        vhv = _vhv(fmodel, batches, refs, weights, vs, loss_of, total)
        for k, n in enumerate(layers):
            sums[n] += vhv[k]
        done = i + 1
        history.append(sum(sums.values()) / done)
        if done >= 4:
            half = history[done // 2 - 1]
            rel = abs(history[-1] - half) / max(abs(history[-1]), 1e-30)
            if rel < tol:
                stopped_by = "converged"
                break
        if done >= 2 and time.perf_counter() - start > max_seconds:
            stopped_by = "time"
            break
    for w in weights:
        w.requires_grad_(False)
    return HessianTrace(
        traces={n: s / done for n, s in sums.items()},
        params={n: int(layers[n].weight.numel()) for n in layers},
        samples=done,
        images=total,
        wall_s=time.perf_counter() - start,
        relative_change=rel,
        stopped_by=stopped_by,
    )


def _check_trace_args(
    model: nn.Module, loss_fn: LossFn | None, samples: int, max_seconds: float, num_samples: int
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for label, value in (("samples", samples), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


def _vhv(
    fmodel: nn.Module,
    batches: list[Any],
    refs: list[Tensor],
    weights: list[Tensor],
    vs: list[Tensor],
    loss_of: LossFn,
    total: int,
) -> list[float]:
    """v^T H v per weight tensor for one Rademacher vector v (Hessian-vector products by double
    backpropagation), the loss weighted by each batch's share of the samples."""
    vhv = [0.0] * len(weights)
    for batch, ref in zip(batches, refs, strict=True):
        out = _first_float_tensor(call_model(fmodel, batch))
        loss = loss_of(out, ref) * (batch_size(batch) / total)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        hvs = torch.autograd.grad(grads, weights, grad_outputs=vs)
        for k, (hv, v) in enumerate(zip(hvs, vs, strict=True)):
            vhv[k] += float((hv * v).sum())
    return vhv


@torch.no_grad()
def weight_error(
    model: nn.Module,
    calib_data: Iterable[Any],
    candidates: Sequence[int],
    recipe: Recipe | None = None,
    act_bits: int | None = 8,
) -> dict[str, dict[int, float]]:
    """||Q_b(W) - W||^2 of every layer's BN-folded weight at every candidate width, with the
    library's weight quantizer (its spec and observer; round to nearest)."""
    batches = collect_batches(calib_data, 1, "calib_data")
    base = base_recipe(recipe, act_bits)
    fmodel = float_instrumented(model, uniform_recipe(base, 8), batches[0])
    out: dict[str, dict[int, float]] = {}
    for name, m in fmodel.named_modules():
        if not (isinstance(m, QuantMixin) and m.weight_quantizer is not None):
            continue
        w = m.weight.detach()
        for b in candidates:
            q = TensorQuantizer(m.weight_quantizer.spec.replace(bits=b), name, role="weight")
            q.calibrate_tensor(w)
            q.set_mode("quantize")
            out.setdefault(name, {})[b] = float(((q(w) - w) ** 2).sum())
    return out


@torch.no_grad()
def pipeline_weight_error(quantized: UniformModels) -> dict[str, dict[int, float]]:
    """||Q_b(W) - W||^2 with Q_b what the PTQ pipeline deployed at each width (learned rounding
    included) and W the float weight of the same coordinates."""
    out: dict[str, dict[int, float]] = {}
    for b, qmodel in quantized.models.items():
        floats = quantized.float_params[b]
        for name, m in qmodel.named_modules():
            if not (isinstance(m, QuantMixin) and m.weight_quantizer is not None):
                continue
            wq = m.weight_quantizer
            saved = wq.mode
            wq.mode = "quantize"
            try:
                deployed = wq(m.weight.detach())
            finally:
                wq.mode = saved
            out.setdefault(name, {})[b] = float(((deployed - floats[name][0]) ** 2).sum())
    return out


def hessian_sensitivity(
    trace: HessianTrace, errors: Mapping[str, Mapping[int, float]], candidates: Sequence[int]
) -> Sensitivity:
    """HAWQ-v3's Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2 for every layer and width."""
    avg = trace.average()
    missing = [n for n in avg if n not in errors]
    if missing:
        raise ValueError(f"no weight error for layers {missing[:5]}")
    scores = {n: {b: avg[n] * float(errors[n][b]) for b in candidates} for n in avg}
    return Sensitivity(
        scores=scores,
        method="hessian",
        metric="Tr(H)/n x ||Q_b(W) - W||^2 (HAWQ-v3), H of KL to the FP32 predictions",
        candidates=tuple(sorted(candidates)),
        samples=trace.images,
        wall_s=trace.wall_s,
        notes=[
            f"Hutchinson: {trace.samples} Rademacher vectors on {trace.images} samples, "
            f"stopped by {trace.stopped_by} (last relative change {trace.relative_change:.3g})"
        ],
    )


def spearman(a: Sensitivity, b: Sensitivity, bits: int | None = None) -> float:
    """Spearman rank correlation of two sensitivities' per-layer scores at `bits`
    (default: the lowest common candidate)."""
    from scipy.stats import spearmanr

    common = sorted(set(a.candidates) & set(b.candidates))
    if not common:
        raise ValueError("the two sensitivities share no candidate bit width")
    bb = common[0] if bits is None else bits
    if bb not in common:
        raise ValueError(f"bits={bb} is not a candidate of both ({common})")
    layers = [n for n in a.scores if n in b.scores]
    if len(layers) < 2:
        raise ValueError("fewer than two layers in common: no ranking to compare")
    rho = spearmanr([a.scores[n][bb] for n in layers], [b.scores[n][bb] for n in layers])
    return float(rho.statistic)
