"""Feed calibration data through a model whose activation quantizers observe."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from edgequant.batches import batch_size, call_model, check_finite, naming_the_batch
from edgequant.quantizer import calibration_mode, quantizers


def peek(calib_data: Iterable[Any] | None, what: str = "calib_data") -> tuple[Any, Iterator[Any]]:
    """The first item and an iterator that still yields it."""
    if calib_data is None:
        raise ValueError(f"{what} is required for this method")
    if isinstance(calib_data, (Tensor, dict)):
        raise TypeError(
            f"{what} must be an iterable of model inputs (a DataLoader, a list of batches), "
            f"not a single {type(calib_data).__name__}; wrap it in a list: [batch]"
        )
    try:
        it = iter(calib_data)
    except TypeError as err:
        raise TypeError(f"{what} must be iterable, got {type(calib_data).__name__}") from err
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"{what} is empty: at least one batch of model inputs is needed") from None
    check_not_text(first, f"{what} item 0" if what == "calib_data" else what)
    return first, itertools.chain([first], it)


def check_not_text(batch: Any, what: str) -> None:
    """A batch of raw text (strings, or a dict holding them) is refused with what to do: the
    model takes token ids, and edgequant holds no tokenizer."""
    values = list(batch.values()) if isinstance(batch, dict) else [batch]
    for value in values:
        if isinstance(value, str) or (
            isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
        ):
            raise TypeError(
                f"{what} is text ({type(value).__name__} of str): the model takes token ids. "
                "Tokenize it first, e.g. dict(tokenizer(texts, return_tensors='pt', "
                "padding=True)) per batch"
            )


def check_context(model: nn.Module, batch: Any, what: str) -> None:
    """A batch of token ids longer than the model's context (config.max_position_embeddings
    of a Hugging Face model) is refused, naming both lengths."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if (
        isinstance(limit, int)
        and isinstance(ids, Tensor)
        and ids.dim() == 2
        and not ids.is_floating_point()
        and ids.shape[1] > limit
    ):
        raise ValueError(
            f"{what} holds sequences of {ids.shape[1]} tokens, longer than the model's "
            f"context of {limit} tokens (config.max_position_embeddings); cut them into "
            f"windows of at most {limit}"
        )


def take_samples(batch: Any, n: int) -> Any:
    """The first n samples of a batch."""
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, (tuple, list)):
        return type(batch)(
            take_samples(b, n) if isinstance(b, Tensor) and b.dim() > 0 else b for b in batch
        )
    if hasattr(batch, "keys"):
        return {
            k: (v[:n] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in batch.items()
        }
    return batch


def run_calibration(
    model: nn.Module, batches: Iterable[Any], num_samples: int, progress: bool = False
) -> int:
    """Observe activations on up to num_samples samples; fix every activation quantizer's
    scale and zero point; return the number of samples used."""
    seen = 0
    with (
        calibration_mode(model),
        torch.no_grad(),
        tqdm(
            total=num_samples, desc="calibrating", unit="sample", disable=not progress, leave=False
        ) as bar,
    ):
        for index, batch in enumerate(batches):
            n = batch_size(batch)
            if seen + n > num_samples:
                batch, n = take_samples(batch, num_samples - seen), num_samples - seen
            check_finite(batch, index)
            with naming_the_batch(batch, f"calib_data item {index}"):
                call_model(model, batch, index)
            seen += n
            bar.update(n)
            if seen >= num_samples:
                break
    if seen == 0:
        raise ValueError("calib_data yielded no samples")
    for q in quantizers(model):
        if q.role == "activation" and q.mode != "dynamic":
            q.compute_qparams()
            q.set_mode("quantize")
    return seen


def collect(batches: Iterable[Any], num_samples: int, notes: list[str] | None = None) -> list[Any]:
    """Up to num_samples samples of `batches`, as a list of batches (for passes that read the
    calibration data more than once). Where `batches` holds more samples than that, `notes`
    (a summary's notes) gets a line that says so: a user who passed them expects them used."""
    out: list[Any] = []
    seen = 0
    more = False
    it = iter(batches)
    for index, batch in enumerate(it):
        n = batch_size(batch)
        if seen + n > num_samples:
            batch, n, more = take_samples(batch, num_samples - seen), num_samples - seen, True
        check_finite(batch, index)
        out.append(batch)
        seen += n
        if seen >= num_samples:
            more = more or next(it, _END) is not _END
            break
    if seen == 0:
        raise ValueError("calib_data yielded no samples")
    if more and notes is not None:
        notes.append(
            f"calibrated on the first {seen} samples of calib_data, which holds more: the cap is "
            f"num_samples={num_samples} (default Recipe.calib_samples); raise it to use them all"
        )
    return out


_END = object()


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


def capture_inputs(model: nn.Module, layer: nn.Module, batches: list[Any]) -> list[Tensor]:
    """The first positional input of `layer` for each batch, as the model computes it now
    (quantizers in their current modes); the forward stops at the layer."""
    captured: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach())
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                with (
                    contextlib.suppress(_Stop),
                    naming_the_batch(batch, f"calib_data item {index}"),
                ):
                    call_model(model, batch, index)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(
            f"layer {getattr(layer, 'layer_name', type(layer).__name__)!r} ran on "
            f"{len(captured)} of {len(batches)} calibration batches"
        )
    return captured


def without_quantizers(
    qmodel: nn.Module, roles: tuple[str, ...] = ("activation", "weight")
) -> nn.Module:
    """A copy of the quantized model with its quantizers of `roles` off: all of them gives the
    float model's values at every layer (the target learned rounding reconstructs)."""
    reference = copy.deepcopy(qmodel)
    for q in quantizers(reference):
        if q.role in roles:
            q.mode = "disabled"
    return reference
