"""A causal LM's choice of the QAT epoch kept: each held-out sequence's mean next-token negative
log-likelihood (perplexity is its exponential; lower is better), and an epoch replaces the
start only when the paired per-sequence decrease is more than SELECTION_Z standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from edgequant.batches import call_model, in_eval_mode
from edgequant.metrics import logits_of
from edgequant.ptq.calibrate import check_not_text

# An epoch replaces the start only when it wins by more than SELECTION_Z standard errors of the
# paired difference: here on held-out losses, in selection.py on held-out hits.
SELECTION_Z = 2.0

# EpochChooser's `against` for a causal LM: held-out losses (next-token NLL), not hits.
NEXT_TOKENS = "next tokens (NLL, lower is better)"


def heldout_nll(held: Iterable[Any]) -> Callable[[nn.Module], torch.Tensor]:
    """model -> each held-out sequence's mean next-token negative log-likelihood (nats), a float
    tensor, for a causal LM whose held-out batches are token ids (dicts with "input_ids", or
    (batch, tokens) tensors); positions whose attention_mask is 0 do not count."""
    batches: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
    for index, batch in enumerate(held):
        check_not_text(batch, f"held-out batch {index}")
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise TypeError(
                f"held-out batch {index}: a causal LM's held-out text is token ids (a dict with "
                f"'input_ids' or a (batch, tokens) tensor), got {type(batch).__name__}"
            )
        if ids.shape[1] < 2:
            raise ValueError(f"held-out batch {index} has {ids.shape[1]} token: nothing to predict")
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        keep = (mask if isinstance(mask, torch.Tensor) else torch.ones_like(ids))[:, 1:] > 0
        batches.append((batch, ids, keep))

    def nll(model: nn.Module) -> torch.Tensor:
        found = []
        with in_eval_mode(model), torch.no_grad():
            for batch, ids, keep in batches:
                logits = logits_of(call_model(model, batch))[:, :-1].float()
                token_nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), ids[:, 1:], reduction="none"
                )
                found.append((token_nll * keep).sum(1) / keep.sum(1).clamp_min(1))
        return torch.cat(found)

    return nll


def select_epoch_by_loss(losses: Sequence[torch.Tensor], z: float = SELECTION_Z) -> tuple[int, str]:
    """(epoch to keep, why) from each held-out sequence's loss (lower is better: mean
    next-token NLL), losses[0] being the start's.

    The candidate is the epoch with the lowest mean, the latest on a tie. It replaces the start
    only if the per-sequence decrease d = start - candidate has mean(d) > z * std(d) / sqrt(n):
    a gain of more than z standard errors of the paired difference, by sequence (tokens of one
    sequence are not independent). Otherwise QAT keeps the start."""
    if not losses:
        raise ValueError("losses is empty: it needs at least the start's (epoch 0)")
    for epoch, t in enumerate(losses):
        if (
            not isinstance(t, torch.Tensor)
            or not t.is_floating_point()
            or t.shape != losses[0].shape
        ):
            raise ValueError(
                f"losses[{epoch}] must be a float tensor shaped like losses[0], got "
                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z >= 0:
        raise ValueError(f"z must be a number >= 0, got {z!r}")
    if len(losses) < 2:
        return 0, "no QAT epoch ran: the PTQ start is kept"
    means = [float(t.double().mean()) for t in losses]
    best = min(range(1, len(losses)), key=lambda e: (means[e], -e))
    d = (losses[0] - losses[best]).double()
    n = int(d.numel())
    se = float(d.std(unbiased=True)) / n**0.5 if n > 1 else float("inf")
    shown = ", ".join(f"epoch {e}: {math.exp(m):.4g}" for e, m in enumerate(means))
    detail = (
        f"held-out perplexity over {n} sequences ({shown}); the best epoch, {best}, lowers the "
        f"mean per-sequence NLL by {float(d.mean()):.4g} nats"
    )
    if float(d.mean()) > z * se:
        return best, f"kept epoch {best}: {detail}, more than {z:g} standard errors ({z * se:.3g})"
    if float(d.mean()) <= 0:
        return 0, f"kept the PTQ start (epoch 0): {detail}: no epoch gained on it"
    return 0, (
        f"kept the PTQ start (epoch 0): {detail}, within {z:g} standard errors ({z * se:.3g}): "
        "not distinguishable from noise"
    )


__all__ = ["NEXT_TOKENS", "SELECTION_Z", "heldout_nll", "select_epoch_by_loss"]
