"""Per-layer sensitivity to weight quantization, measured without gradients (perturbation).
As in Cai et al., "ZeroQ", CVPR 2020, section 3.3 (KL of the outputs with one layer quantized),
here with the library's own PTQ pipeline at each bit width.

The model is quantized once per candidate bit width, uniformly, with `eq.quantize` (so whatever
the pipeline does at that width, learned rounding and bias correction included, is what is
measured). Then, in the model of each width, every layer is put back to float (quantizers off,
float weights and biases swapped in, no re-instrumentation), and one layer at a time gets its
quantized weight, corrected bias and weight quantizer back; the model's output on calibration
data is compared with the FP32 model's (computed once).

Others float, not others at 8 bits: the score is then the layer's own effect, zero when nothing is
quantized, which is what an additive objective (allocate) and the Hessian route (weights only,
float activations) assume; at 8 bits the other layers' noise is small anyway, and it would add the
same amount to every layer's score. The score is the increase over the all-float baseline
(`baseline`: zero up to float rounding, or the change equalization makes, which is
function-preserving only up to its bias absorption).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from edgequant.batches import batch_size, call_model, in_eval_mode, metric_number, removing_hooks
from edgequant.mixed.allocate import _check_candidates
from edgequant.modules import QuantMixin
from edgequant.ptq.calibrate import peek, take_samples
from edgequant.ptq.quantize import quantize
from edgequant.quantizer import quantizers
from edgequant.recipe import Recipe
from edgequant.spec import LayerOverride, QuantSpec, activation_spec, weight_spec

EvalFn = Callable[[nn.Module], float]


def eval_metric(eval_fn: EvalFn, model: nn.Module, what: str) -> float:
    """eval_fn(model) as a finite float (batches.metric_number); `what` names the model in the
    error (e.g. "the FP32 model", "the plan at 2.50 bits per weight")."""
    return metric_number(eval_fn(model), "eval_fn", what)


@dataclass
class LayerCosts:
    """Quantized layers (execution order of named_modules), their weight parameters and MACs per sample."""

    params: dict[str, int]
    macs: dict[str, int]

    @property
    def layers(self) -> list[str]:
        return list(self.params)


@dataclass
class Sensitivity:
    """scores[layer][bits]: the cost of quantizing that layer's weights at that width alone."""

    scores: dict[str, dict[int, float]]
    method: str
    metric: str
    candidates: tuple[int, ...]
    baseline: dict[int, float] = field(default_factory=dict)
    samples: int = 0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def ranking(self, bits: int | None = None) -> list[str]:
        """Layers from most to least sensitive at `bits` (default: the lowest candidate)."""
        b = min(self.candidates) if bits is None else bits
        return sorted(self.scores, key=lambda n: self.scores[n][b], reverse=True)


def base_recipe(recipe: Recipe | None, act_bits: int | None) -> Recipe:
    """The recipe a mixed plan starts from: the caller's, or per-channel weights with per-tensor
    activations at act_bits (None: weight-only)."""
    if recipe is None:
        return Recipe(
            name="mixed",
            weight=weight_spec(8),
            activation=activation_spec(act_bits) if act_bits is not None else None,
        )
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be an edgequant.Recipe or None, got {type(recipe).__name__}")
    if recipe.weight is None:
        raise ValueError(f"recipe {recipe.name!r} quantizes no weights: nothing to allocate")
    activation = recipe.activation
    if activation is not None and act_bits is not None:
        activation = activation.replace(bits=act_bits)
    return recipe.replace(activation=activation)


def with_layer_bits(base: Recipe, bits: Mapping[str, int], name: str) -> Recipe:
    """`base` with every layer's weight bits set by one exact-name override each.

    Overrides of `base` keep their activation and skip settings; their weight specs are dropped,
    so the bits asked here are the bits used. first_last_bits is cleared and reduce_range is off
    (it would move 8-bit layers to 7 bits): the plan decides."""
    assert base.weight is not None
    kept = tuple(
        LayerOverride(o.pattern, None, o.activation, o.skip)
        for o in base.overrides
        if o.skip or o.activation is not None
    )
    per_layer = tuple(
        LayerOverride(exact_pattern(layer), weight_at(base.weight, b)) for layer, b in bits.items()
    )
    return base.replace(
        name=name, overrides=kept + per_layer, first_last_bits=None, reduce_range=False
    )


def weight_at(spec: QuantSpec, bits: int) -> QuantSpec:
    """`spec` at `bits`, its range observer chosen as Recipe.preset chooses it: the MSE search
    below 8 bits, min/max at 8 and above, wherever `spec` uses one of those two (the library's
    defaults); any other observer (percentile, ...) is the caller's choice and kept. Without this
    a plan built on the default W8 base put its 2- and 3-bit layers on min/max grids that the
    uniform presets at the same widths do not use: ResNet-20's 2.5-bit plan, held-out KL to FP32
    0.196 on min/max grids, 0.080 on MSE grids (BENCHMARKS.md, issue 11)."""
    if spec.observer in ("minmax", "mse"):
        return spec.replace(bits=bits, observer="mse" if bits < 8 else "minmax")
    return spec.replace(bits=bits)


def uniform_recipe(base: Recipe, bits: int) -> Recipe:
    """Every layer's weights at `bits` (first_last_bits cleared, weight overrides dropped)."""
    assert base.weight is not None
    act = f"a{base.activation.bits}" if base.activation is not None else "-weight-only"
    recipe = with_layer_bits(base, {}, f"w{bits}{act}")
    return recipe.replace(weight=weight_at(base.weight, bits))


def exact_pattern(name: str) -> str:
    """A glob that matches exactly `name` (fnmatch's special characters bracketed)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def method_for(recipe: Recipe) -> str:
    return "weight_only" if recipe.activation is None else "static"


def collect_batches(calib_data: Iterable[Any], num_samples: int, what: str) -> list[Any]:
    """Up to num_samples samples of calib_data, as a list of batches (it is read many times)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    _, items = peek(calib_data, what)
    out, seen = [], 0
    for batch in items:
        n = batch_size(batch)
        if seen + n > num_samples:
            batch, n = take_samples(batch, num_samples - seen), num_samples - seen
        out.append(batch)
        seen += n
        if seen >= num_samples:
            break
    return out


def layer_costs(qmodel: nn.Module, example_batch: Any) -> LayerCosts:
    """Weight parameters and MACs per sample of every layer with a weight quantizer."""
    params: dict[str, int] = {}
    macs: dict[str, int] = {}
    hooks = []
    n = max(batch_size(example_batch), 1)

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            if not isinstance(out, Tensor) or isinstance(mod, nn.Embedding):
                macs[name] = 0
                return
            weight = cast(Tensor, mod.weight)
            # Each output element costs (weight elements per output channel) MACs.
            per_output = weight[0].numel()
            channels = out.shape[-1] if isinstance(mod, nn.Linear) else out.shape[1]
            macs[name] = int(out.numel() // n // channels * channels * per_output)

        return record

    for name, m in qmodel.named_modules():
        if isinstance(m, QuantMixin) and m.weight_quantizer is not None:
            params[name] = int(m.weight.numel())
            hooks.append(m.register_forward_hook(hook(name)))
    with removing_hooks(hooks), torch.no_grad(), _all_quantizers("disabled", qmodel):
        call_model(qmodel, example_batch)
    for name in params:
        macs.setdefault(name, 0)
    return LayerCosts(params, macs)


@contextlib.contextmanager
def _all_quantizers(mode: str, model: nn.Module) -> Iterator[None]:
    """Every quantizer of `model` in `mode`; the modes are restored on exit, even on error."""
    saved = {q: q.mode for q in quantizers(model)}
    try:
        for q in saved:
            q.mode = mode
        yield
    finally:
        for q, m in saved.items():
            q.mode = m


@dataclass
class UniformModels:
    """One `eq.quantize`d copy of the model per bit width, and, per width, every layer's float
    (weight, bias) in that copy's coordinates: what the layer holds before learned rounding
    and bias correction (after equalization, when the pipeline equalizes)."""

    models: dict[int, nn.Module]
    float_params: dict[int, dict[str, tuple[Tensor, Tensor | None]]]


def _weight_layers(qmodel: nn.Module) -> list[tuple[str, QuantMixin]]:
    return [
        (name, m)
        for name, m in qmodel.named_modules()
        if isinstance(m, QuantMixin) and m.weight_quantizer is not None
    ]


def _params_of(qmodel: nn.Module) -> dict[str, tuple[Tensor, Tensor | None]]:
    return _params_of_layers(_weight_layers(qmodel))


def quantize_uniform(
    model: nn.Module,
    calib_batches: Sequence[Any],
    candidates: Sequence[int],
    base: Recipe,
    num_calib: int | None = None,
) -> UniformModels:
    """`eq.quantize` of `model` at each candidate width, every layer at that width."""
    models: dict[int, nn.Module] = {}
    floats: dict[int, dict[str, tuple[Tensor, Tensor | None]]] = {}
    method = method_for(base)
    for b in candidates:
        recipe = uniform_recipe(base, b)
        models[b] = quantize(model, recipe, calib_batches, method=method, num_samples=num_calib)
        pipeline = cast("dict[str, Any]", models[b].quant_info).get("pipeline", {})
        if pipeline.get("rounding", "nearest") == "nearest" and not pipeline.get(
            "bias_correction", False
        ):
            floats[b] = _params_of(models[b])
            continue
        # Learned rounding writes the rounded weights into the layers and bias correction
        # changes the biases: the float weights of the same coordinates (equalization kept) come
        # from the same pipeline with both switched off.
        plain = recipe.replace(
            rounding="nearest",
            bias_correction=False,
            equalize=pipeline.get("equalize", recipe.equalize),
        )
        floats[b] = _params_of(
            quantize(model, plain, calib_batches, method=method, num_samples=num_calib)
        )
    return UniformModels(models, floats)


@contextlib.contextmanager
def _params_swapped(
    layers: list[tuple[str, QuantMixin]], params: Mapping[str, tuple[Tensor, Tensor | None]]
) -> Iterator[None]:
    """Every layer's weight and bias replaced by `params` in place; restored on exit."""
    saved = _params_of_layers(layers)
    try:
        _load_params(layers, params)
        yield
    finally:
        _load_params(layers, saved)


def _params_of_layers(
    layers: list[tuple[str, QuantMixin]],
) -> dict[str, tuple[Tensor, Tensor | None]]:
    return {
        n: (m.weight.detach().clone(), m.bias.detach().clone() if m.bias is not None else None)
        for n, m in layers
    }


@torch.no_grad()
def _load_params(
    layers: list[tuple[str, QuantMixin]], params: Mapping[str, tuple[Tensor, Tensor | None]]
) -> None:
    for n, m in layers:
        weight, bias = params[n]
        m.weight.copy_(weight)
        if m.bias is not None and bias is not None:
            m.bias.copy_(bias)


def _first_float_tensor(out: Any) -> Tensor:
    flat, _ = torch.utils._pytree.tree_flatten(out)
    for t in flat:
        if isinstance(t, Tensor) and t.is_floating_point():
            return t
    raise TypeError("the model's output holds no floating-point tensor to compare")


def kl_to_reference(logits: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Sum over samples of KL(p_ref || p) over the last dim (softmax of the outputs)."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    p = ref_log_probs.exp()
    return (p * (ref_log_probs - log_q)).sum(dim=-1).sum()


def reference_outputs(model: nn.Module, batches: Sequence[Any]) -> list[Tensor]:
    """The FP32 model's log-softmax outputs on every batch (computed once, reused)."""
    with in_eval_mode(model), torch.no_grad():
        return [
            torch.log_softmax(_first_float_tensor(call_model(model, b)).float(), dim=-1)
            for b in batches
        ]


@torch.no_grad()
def mean_kl(model: nn.Module, batches: Sequence[Any], refs: Sequence[Tensor]) -> float:
    """Mean KL(FP32 || model) of the softmax outputs over the samples of `batches`."""
    total, count = 0.0, 0
    for batch, ref in zip(batches, refs, strict=True):
        out = _first_float_tensor(call_model(model, batch))
        total += float(kl_to_reference(out, ref))
        count += ref.reshape(-1, ref.shape[-1]).shape[0]
    return total / max(count, 1)


def sensitivity(
    model: nn.Module,
    calib_data: Iterable[Any],
    candidates: Sequence[int] = (2, 3, 4, 8),
    act_bits: int | None = 8,
    eval_fn: EvalFn | None = None,
    recipe: Recipe | None = None,
    num_samples: int = 256,
    quantized: UniformModels | None = None,
    progress: bool = False,
) -> Sensitivity:
    """Perturbation sensitivity of every quantizable layer at every candidate weight width.

    Score: mean KL divergence of the softmax outputs from the FP32 model's, over `num_samples`
    calibration samples; with `eval_fn(model) -> float` (higher is better, e.g. held-out
    accuracy), the drop of that metric instead. The model is quantized once per width (recipe:
    `recipe` or per-channel weights, per-tensor activations at act_bits, calibrated on
    calib_data); `quantized` passes those models in when they already exist.
    """

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable (model -> float), got {type(eval_fn).__name__}")
    cands = _check_candidates(candidates)
    start = time.perf_counter()
    base = base_recipe(recipe, act_bits)
    batches = collect_batches(calib_data, max(num_samples, base.calib_samples), "calib_data")
    measure_batches = collect_batches(batches, num_samples, "calib_data")
    if quantized is None:
        quantized = quantize_uniform(model, batches, cands, base)
    missing = [b for b in cands if b not in quantized.models]
    if missing:
        raise ValueError(f"quantized has no model for bit widths {missing}")

    measure, metric = _metric(model, measure_batches, eval_fn)
    scores, baseline = _scores(quantized, cands, measure, progress)
    notes = []
    worst = max(baseline.values())
    if worst > 1e-6 and eval_fn is None:
        notes.append(
            f"baseline (float weights, quantizers off) differs from FP32 by KL up to "
            f"{worst:.3g}; scores are increases over it"
        )
    return Sensitivity(
        scores=scores,
        method="perturbation",
        metric=metric,
        candidates=cands,
        baseline=baseline,
        samples=sum(batch_size(b) for b in measure_batches),
        wall_s=time.perf_counter() - start,
        notes=notes,
    )


def _metric(
    model: nn.Module, measure_batches: list[Any], eval_fn: EvalFn | None
) -> tuple[Callable[[nn.Module], float], str]:
    """measure(model) -> the score of a perturbed model (mean KL of its softmax outputs from
    the FP32 model's, or eval_fn's drop from FP32), and what it measures."""
    refs: list[Tensor] = []
    if eval_fn is None:
        refs = reference_outputs(model, measure_batches)

        def measure(m: nn.Module) -> float:
            return mean_kl(m, measure_batches, refs)

        metric = "mean KL(FP32 || quantized) of the softmax outputs"
    else:
        user_fn = eval_fn
        reference = eval_metric(user_fn, model, "the FP32 model")

        def measure(m: nn.Module) -> float:
            return reference - eval_metric(user_fn, m, "a model with one layer quantized")

        metric = "drop of eval_fn (FP32 minus quantized)"
    return measure, metric


def _scores(
    quantized: UniformModels,
    cands: tuple[int, ...],
    measure: Callable[[nn.Module], float],
    progress: bool,
) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """(layer -> {bits: score over the baseline}, bits -> baseline): at each width, every layer
    alone quantized as the pipeline quantized it, the rest float."""
    scores: dict[str, dict[int, float]] = {}
    baseline: dict[int, float] = {}
    layers: list[str] = []
    total = len(_weight_layers(quantized.models[cands[0]])) * len(cands)
    with tqdm(total=total, desc="sensitivity", disable=not progress, leave=False) as bar:
        for b in cands:
            qmodel = quantized.models[b].eval()
            weight_layers = _weight_layers(qmodel)
            if not layers:
                layers = [name for name, _ in weight_layers]
            elif [name for name, _ in weight_layers] != layers:
                raise ValueError(f"the {b}-bit model quantizes other layers than the others")
            pipeline_params = _params_of_layers(weight_layers)
            floats = quantized.float_params[b]
            # Everything float (quantizers off, float weights and biases); then one layer at a
            # time gets the pipeline's weight, bias and weight quantizer back.
            with _all_quantizers("disabled", qmodel), _params_swapped(weight_layers, floats):
                baseline[b] = measure(qmodel)
                for name, layer in weight_layers:
                    wq = layer.weight_quantizer
                    assert wq is not None
                    one = [(name, layer)]
                    with _params_swapped(one, {name: pipeline_params[name]}):
                        wq.set_mode("quantize")
                        try:
                            scores.setdefault(name, {})[b] = measure(qmodel) - baseline[b]
                        finally:
                            wq.set_mode("disabled")
                    bar.update(1)
    return scores, baseline
