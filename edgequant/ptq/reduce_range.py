"""7-bit weights for the 8-bit layers that meet 8-bit unsigned activations, where learned rounding
makes the lost bit cost nothing: ONNX Runtime's fast integer kernel then runs them exactly on
every x86 CPU.

ONNX Runtime runs an 8-bit layer between uint8 activations with a u8s8 kernel. On x86 CPUs
without VNNI it multiplies with VPMADDUBSW, which sums each pair of uint8 x int8 products in int16
and saturates unless |weight| <= 64 (255 x 64 x 2 < 32767). The exporter therefore stores 8-bit
weights as UINT8 + 128 (export/int8_kernels.py: the u8u8 kernel, exact and slower). Weights on a
7-bit grid stay INT8 and run the fast kernel exactly: ONNX Runtime's own `reduce_range`, which
rounds to nearest. Here each candidate layer gets its 7-bit weights by GPTQ (Frantar et al. 2023,
ptq/gptq.py) and keeps them where the layer's quantized output error against the float layer on
float inputs, ||Q(W) X_q - W X||^2 (X_q: its quantized inputs), measured on every HOLD_OUT-th
calibration sample (the rounding does not see them), grows by at most TOLERANCE over the 8-bit
weights the pipeline would give it (round to nearest). The input's own quantization error is
part of that error, so a layer whose inputs are coarser than its weights loses nothing
measurable at 7 bits. Where the pipeline rounds 8-bit weights with GPTQ (it found Linear inputs with outlier channels, as in
transformers) the layers keep 8 bits: there the 5 % per layer added up over the network.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from edgequant.batches import batch_size, call_model, naming_the_batch
from edgequant.modules import QuantMixin, fast_simulation
from edgequant.ptq.calibrate import without_quantizers
from edgequant.ptq.gptq import gptq_weight
from edgequant.ptq.rounding import as_columns, layer_input, supports, weight_grid
from edgequant.quantizer import TensorQuantizer
from edgequant.spec import QuantSpec

REDUCED_BITS = 7


def candidate(layer: QuantMixin) -> bool:
    """An 8-bit signed weight grid read by an 8-bit unsigned activation quantizer with fixed
    parameters: the layer ONNX Runtime would run with the u8s8 kernel."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    return (
        wq is not None
        and wq.mode == "quantize"
        and wq.spec.bits == 8
        and wq.spec.signed
        and iq is not None
        and iq.mode == "quantize"
        and iq.spec.bits == 8
        and not iq.spec.signed
    )


# The relative growth of a layer's output error that counts as losing nothing.
TOLERANCE = 0.05

# Every HOLD_OUT-th sample (dim 0 of the layer's input, counted across batches, so the split does
# not depend on the batching) scores the rounding that the other samples fit.
HOLD_OUT = 4

# At most this many rows (samples x positions) per layer enter the Gram matrices: a convolution's
# positions are taken at a stride that keeps the count under it (GPTQ's Hessian needs many more
# rows than columns, not every position of every image).
MAX_ROWS = 1 << 16


class Grams:
    """One layer's input statistics, summed in float64 over the calibration samples: X_q^T X_q
    of the samples the rounding fits; X_q^T X_q, X_q^T D and D^T D of the held-out ones (X_q:
    the inputs as the layer quantizes them, X: the float model's inputs to the layer, D = X_q -
    X: the input's own quantization error, summed directly so that small errors are not lost
    in the difference of large sums)."""

    def __init__(self, cols: int) -> None:
        zeros = lambda: torch.zeros(cols, cols, dtype=torch.float64)  # noqa: E731
        self.fit, self.qq, self.qd, self.dd = zeros(), zeros(), zeros(), zeros()
        self.n_fit = self.n_score = 0
        self.seen = 0  # samples so far
        self.stride = 0  # positions taken per sample: every stride-th (0: not yet known)
        self.pending: Tensor | None = None  # the float model's held-out columns, this batch

    def held_out(self, n: int) -> Tensor:
        """Which of the next n samples are held out."""
        return torch.arange(self.seen, self.seen + n) % HOLD_OUT == HOLD_OUT - 1

    def add_float(self, cols: Tensor) -> None:
        self.pending = cols.reshape(-1, cols.shape[-1]).double()

    def add_quantized(self, cols: Tensor, held: Tensor) -> None:
        """cols: (samples, rows per sample, columns) of the quantized inputs."""
        fit = cols[~held].reshape(-1, cols.shape[-1]).double()
        score = cols[held].reshape(-1, cols.shape[-1]).double()
        self.fit += fit.T @ fit
        self.n_fit += fit.shape[0]
        if score.shape[0]:
            assert self.pending is not None and self.pending.shape == score.shape
            d = score - self.pending
            self.qq += score.T @ score
            self.qd += score.T @ d
            self.dd += d.T @ d
            self.n_score += score.shape[0]
        self.seen += int(held.numel())
        self.pending = None

    def fit_hessian(self) -> Tensor:
        """GPTQ's H on the fitted samples; all samples where too few were held out or fitted."""
        if self.n_score == 0 or self.n_fit == 0:
            return self.all_hessian()
        return self.fit * (2.0 / self.n_fit)

    def all_hessian(self) -> Tensor:
        return (self.fit + self.qq) * (2.0 / max(self.n_fit + self.n_score, 1))

    def scored(self) -> bool:
        return self.n_score > 0 and self.n_fit > 0


def output_error(weight: Tensor, quantized: Tensor, g: Grams) -> float:
    """sum over the held-out samples of ||Q x_q - W x||^2: the quantized layer's squared error
    against the float layer on float inputs (no bias: it cancels), from the Gram matrices.
    With E = Q - W and d = x_q - x: Q x_q - W x = E x_q + W d."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    e = quantized.detach().reshape(quantized.shape[0], -1).double() - w
    return float(((e @ g.qq) * e).sum() + 2 * ((e @ g.qd) * w).sum() + ((w @ g.dd) * w).sum())


def _columns(layer: QuantMixin, x: Tensor, g: Grams, samples: int) -> Tensor:
    """(samples, rows per sample, columns): the layer's input as its weight multiplies it, every
    g.stride-th row of each sample (the stride fixed at the first call so that `samples` samples
    give at most MAX_ROWS rows)."""
    with torch.no_grad():
        cols = as_columns(layer, layer_input(layer, x))
    cols = cols.reshape(x.shape[0], -1, cols.shape[-1])
    if g.stride == 0:
        g.stride = max(1, math.ceil(samples * cols.shape[1] / MAX_ROWS))
    return cols[:, :: g.stride]


def collect_grams(
    qmodel: nn.Module, reference: nn.Module, names: list[str], batches: list[Any]
) -> dict[str, Grams]:
    """Grams of every named layer in one pass of each model per batch: the float model first
    (its held-out columns wait in Grams.pending), then the quantized one. The hooks only keep
    each layer's input; the arithmetic runs after the forward, outside any module (a module
    may route the matmuls run inside it: attention's quantized matmuls do)."""
    layers = {n: cast(QuantMixin, qmodel.get_submodule(n)) for n in names}
    grams = {n: Grams(layer.weight[0].numel()) for n, layer in layers.items()}
    samples = sum(batch_size(b) for b in batches)
    seen: dict[str, list[Tensor]] = {n: [] for n in names}

    def keep(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name].append(args[0].detach())

        return hook

    def gather(model: nn.Module, quantized: bool) -> None:
        for name, inputs in seen.items():
            g, layer = grams[name], cast(QuantMixin, model.get_submodule(name))
            for x in inputs:
                cols = _columns(layer, x, g, samples)
                if quantized:
                    g.add_quantized(cols, g.held_out(cols.shape[0]))
                else:
                    g.add_float(cols[g.held_out(cols.shape[0])])
            inputs.clear()

    handles = []
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                with naming_the_batch(batch, f"calib_data item {index}"):
                    for model, quantized in ((reference, False), (qmodel, True)):
                        handles = [
                            model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names
                        ]
                        call_model(model, batch, index)
                        for h in handles:
                            h.remove()
                        gather(model, quantized)
    finally:
        for h in handles:
            h.remove()
    return grams


def _fake_quantized(wq: TensorQuantizer, weight: Tensor) -> Tensor:
    with torch.no_grad():
        return cast(Tensor, wq(weight))


def _set_bits(wq: TensorQuantizer, spec: QuantSpec, weight: Tensor) -> None:
    wq.set_spec(spec)
    wq.calibrate_tensor(weight)
    wq.set_mode("quantize")


def reduce_layer_(layer: QuantMixin, g: Grams, rounding: str, force: bool) -> tuple[bool, float]:
    """Try 7-bit GPTQ weights on one layer; keep them where the output error on the held-out
    samples grows by at most TOLERANCE over the pipeline's 8-bit `rounding` ("nearest" or
    "gptq"), or always with `force`; kept weights are then fitted on every sample. Returns
    (kept, the error ratio 7-bit / 8-bit; nan where no sample was held out)."""
    wq = layer.weight_quantizer
    assert wq is not None
    weight = layer.weight.detach().clone()
    h_fit = g.fit_hessian()
    eight = (
        gptq_weight(weight, h_fit, *weight_grid(layer))
        if rounding == "gptq"
        else _fake_quantized(wq, weight)
    )
    spec8 = wq.spec
    _set_bits(wq, spec8.replace(bits=REDUCED_BITS), weight)
    grid = weight_grid(layer)
    ratio = float("nan")
    if g.scored():
        err8 = output_error(weight, eight, g)
        err7 = output_error(weight, gptq_weight(weight, h_fit, *grid), g)
        ratio = err7 / err8 if err8 > 0 else float("inf")
    if force or ratio <= 1 + TOLERANCE:
        with torch.no_grad():
            layer.weight.copy_(gptq_weight(weight, g.all_hessian(), *grid))
        return True, ratio
    _set_bits(wq, spec8, weight)
    return False, ratio


def reduce_range_(
    qmodel: nn.Module,
    layers: list[tuple[str, QuantMixin]],
    batches: list[Any],
    rounding: str,
    setting: bool | None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Recipe.reduce_range on a calibrated model: each candidate layer of `layers` (execution
    order) judged on its inputs as the 8-bit model computes them, all gathered in one pass of
    the calibration data through the quantized and the float model. Returns the entry for
    quant_info["pipeline"] and the summary's notes."""
    names = [n for n, m in layers if candidate(m)]
    if setting is False or not names:
        why = "off in the recipe" if setting is False else "no 8-bit layer reads uint8 inputs"
        return {"reduce_range": {"layers": [], "why": why}}, []
    if rounding not in ("nearest", "gptq") or (rounding == "gptq" and setting is None):
        why = (
            f"8-bit weights get {rounding} rounding here (the pipeline found them sensitive), "
            if rounding == "gptq"
            else f"not compared with {rounding} rounding: "
        ) + f"{len(names)} layers keep 8 bits (UINT8 in the ONNX file, the exact u8u8 kernel)"
        return {"reduce_range": {"layers": [], "why": why}}, [f"reduce_range: {why}"]
    reference = without_quantizers(qmodel)
    kept: list[str] = []
    ratios: dict[str, float] = {}
    notes: list[str] = []
    rounded: list[str] = []
    for name in names:
        why_not = supports(cast(QuantMixin, qmodel.get_submodule(name)))
        if why_not is None:
            rounded.append(name)
        else:
            notes.append(f"reduce_range: {name} keeps 8 bits ({why_not}: no GPTQ)")
    with fast_simulation(qmodel):
        grams = collect_grams(qmodel, reference, rounded, batches)
    for name in tqdm(rounded, desc="reduce_range", disable=not progress, leave=False):
        layer = cast(QuantMixin, qmodel.get_submodule(name))
        ok, ratios[name] = reduce_layer_(layer, grams.pop(name), rounding, bool(setting))
        if ok:
            kept.append(name)
    notes.append(
        f"reduce_range: {len(kept)} of {len(names)} 8-bit layers with uint8 inputs take 7-bit "
        "GPTQ weights (INT8 within +-64 in the ONNX file: the fast u8s8 kernel, exact on every "
        "CPU)" + ("" if setting else "; the others lose output accuracy at 7 bits and keep 8")
    )
    entry = {
        "layers": kept,
        "output_error_ratio_7_to_8": {
            n: None if math.isnan(r) else round(r, 3) for n, r in ratios.items()
        },
        "why": "recipe: every candidate layer"
        if setting
        else f"output error of 7-bit GPTQ <= {1 + TOLERANCE:g}x that of the 8-bit {rounding} "
        "weights, on calibration samples the rounding did not see",
    }
    return {"reduce_range": entry}, notes
