"""Empirical bias correction (Nagel et al. 2019, section 4.2).

Quantization shifts the mean of a layer's output: rounding errors of weights and inputs do not
average to zero per output channel, and the shift grows through the network. Here the float model
(every quantizer off, the weights before any rounding) and the quantized model run on the same
calibration data; each quantized layer's bias takes the difference of the two per-channel output
means. Layers are corrected in execution order, each against the model as corrected so far.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from edgequant.batches import call_model, naming_the_batch
from edgequant.modules import QuantMixin
from edgequant.quantizer import quantizers


def token_mask(batch: Any) -> Tensor | None:
    """The (batch, tokens) attention mask of a tokenizer batch (a mapping with an
    "attention_mask"), else None: padded positions are left out of the output means."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask
    return None


def channel_mean(layer: nn.Module, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-output-channel mean of a layer's output (channels: dim 1 of convs, last of Linear);
    with a (batch, tokens) mask matching a Linear's (batch, tokens, channels) output, over the
    unmasked positions only."""
    y = y.detach().double()
    if isinstance(layer, nn.Linear):
        if mask is not None and y.dim() == 3 and tuple(mask.shape) == tuple(y.shape[:2]):
            keep = mask.reshape(-1).bool()
            return y.reshape(-1, y.shape[-1])[keep].mean(dim=0)
        return y.reshape(-1, y.shape[-1]).mean(dim=0)
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(dim=1)


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Every quantizer off (the float model the quantized one was built from); restored on exit."""
    saved = {q: q.mode for q in quantizers(model)}
    try:
        for q in saved:
            q.mode = "disabled"
        yield
    finally:
        for q, mode in saved.items():
            q.mode = mode


def float_output_means(
    model: nn.Module,
    layers: dict[str, QuantMixin],
    batches: list[Any],
    real_tokens_only: bool = True,
) -> dict[str, Tensor]:
    """Per-channel output means of each layer in the float model (one pass over the data); with
    real_tokens_only, over the positions each batch's token_mask keeps."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    mask: list[Tensor | None] = [None]

    def make_hook(name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Tensor) -> None:
            m = channel_mean(mod, out, mask[0])
            sums[name] = sums.get(name, torch.zeros_like(m)) + m
            counts[name] = counts.get(name, 0) + 1

        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(make_hook(name)))
    try:
        with float_mode(model), torch.no_grad():
            for index, batch in enumerate(batches):
                mask[0] = token_mask(batch) if real_tokens_only else None
                with naming_the_batch(batch, f"calib_data item {index}"):
                    call_model(model, batch, index)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def correct_bias(
    layer: QuantMixin,
    inputs: list[Tensor],
    float_mean: Tensor,
    masks: Sequence[Tensor | None] | None = None,
) -> float:
    """Shift the layer's bias so its quantized output mean on `inputs` equals `float_mean`
    (`masks`: each batch's token_mask, as float_output_means used them); returns the largest
    shift relative to the output's scale (for the log)."""
    assert layer.bias is not None
    total = torch.zeros_like(float_mean)
    with torch.no_grad():
        for i, x in enumerate(inputs):
            total += channel_mean(layer, layer(x), masks[i] if masks is not None else None)
        delta = float_mean - total / len(inputs)
        layer.bias.add_(delta.to(layer.bias.dtype))
    return float(delta.abs().max())
