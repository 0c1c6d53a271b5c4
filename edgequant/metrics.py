"""Language-model metrics on token windows: perplexity and next-token agreement.

Perplexity here is over non-overlapping windows (not a sliding window): each window of T tokens
is scored on its T - 1 next-token predictions, each with only the window's earlier tokens as
context, and the negative log-likelihoods of all windows are averaged before the exponential.
Non-overlapping windows give a higher perplexity than a sliding window with long context, and
cost one forward pass per window; comparisons hold only between runs on the same windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

__all__ = ["LOWER_IS_BETTER", "logits_of", "next_token_nll", "perplexity"]

# Metrics where a smaller number is better: configs and compare read the direction from here.
LOWER_IS_BETTER = ("perplexity", "loss", "nll")


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, an object with `.logits` (Hugging Face) or the
    first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in the model's output ({type(output).__name__}): expected a "
        "tensor, an object with .logits, or a tuple whose first element is the logits"
    )


def next_token_nll(logits: Tensor, ids: Tensor) -> tuple[float, int]:
    """(sum of the negative log-likelihoods, number of predictions) of each window's next
    tokens: logits (B, T, V) predict ids (B, T) shifted by one."""
    if logits.dim() != 3 or ids.dim() != 2 or logits.shape[:2] != ids.shape:
        raise ValueError(
            f"logits must be (batch, tokens, vocabulary) over ids (batch, tokens); got logits "
            f"{tuple(logits.shape)} and ids {tuple(ids.shape)}"
        )
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = ids[:, 1:].reshape(-1)
    nll = torch_F.cross_entropy(pred, target, reduction="sum")
    return float(nll), int(target.numel())


def perplexity(
    model: nn.Module | Callable[[Tensor], Any],
    windows: Tensor | Iterable[Tensor],
    batch_size: int = 1,
) -> float:
    """Perplexity over non-overlapping token windows (see the module docstring).

    model: a causal LM (called as ``model(input_ids=ids)``) or any callable from ids (B, T) to
    logits (B, T, V), e.g. an ONNX Runtime session wrapped in a function.
    windows: a (N, T) int tensor, or an iterable of (B, T) tensors.
    """
    if isinstance(windows, Tensor):
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(
                f"windows must be (count, tokens) with at least 2 tokens, got {tuple(windows.shape)}"
            )
        batches: Iterable[Tensor] = windows.split(batch_size)
    else:
        batches = windows
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            if isinstance(limit, int) and ids.shape[-1] > limit:
                raise ValueError(
                    f"windows of {ids.shape[-1]} tokens are longer than the model's context of "
                    f"{limit} tokens (config.max_position_embeddings)"
                )
            output = model(input_ids=ids) if isinstance(model, nn.Module) else model(ids)
            nll, n = next_token_nll(logits_of(output), ids)
            total += nll
            count += n
    if count == 0:
        raise ValueError("windows holds no token to predict")
    return math.exp(total / count)
