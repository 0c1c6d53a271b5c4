"""fit_qat's causal-LM pieces: telling a causal LM apart, checking its token-id batches, and its
logits as one row per next-token distribution for distillation (KL per position, padding left
out)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from edgequant.ptq.calibrate import check_context, check_not_text


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM (a model with a config that generates text: can_generate(), as
    *ForCausalLM models do and masked LMs do not), whose batches are token ids and whose outputs
    are logits over the next token at every position."""
    generates = getattr(model, "can_generate", None)
    return getattr(model, "config", None) is not None and callable(generates) and bool(generates())


def split_tokens(batch: Any, index: int) -> tuple[Any, None]:
    """A causal LM's training item: token ids, as a tokenizer batch (a dict with "input_ids")
    or a (batch, tokens) tensor; no labels (the text is its own target, through the teacher)."""
    check_not_text(batch, f"train_data item {index}")
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        keys = f" (keys {sorted(batch)})" if isinstance(batch, dict) else ""
        raise TypeError(
            f"train_data item {index}: a causal LM trains on token ids, a dict with 'input_ids' "
            f"(a tokenizer's output) or a (batch, tokens) int tensor; got "
            f"{type(batch).__name__}{keys}: a tokenizer-less text batch? Tokenize it first"
        )
    return batch, None


def check_token_batches(model: nn.Module, train_data: Iterable[Any]) -> None:
    """Every item of a causal LM's train_data list is token ids that fit the model's context,
    checked before any is held out for choosing the epoch (the error then names the item); a
    DataLoader is checked batch by batch as it trains."""
    if isinstance(train_data, Sequence):
        for index, batch in enumerate(train_data):
            split_tokens(batch, index)
            check_context(model, batch, f"train_data item {index}")


def token_rows(
    x: Any, logits: Tensor, teacher_logits: Tensor | None, index: int
) -> tuple[Tensor, Tensor | None]:
    """A causal LM's logits as one row per next-token distribution, (positions, vocabulary),
    padding (attention_mask 0) left out: distillation is KL per position, averaged."""
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(
            f"teacher logits have shape {tuple(teacher_logits.shape)} on train_data item "
            f"{index}, the model's {tuple(logits.shape)}: pass the FP32 model that qmodel was "
            "prepared from"
        )
    mask = x.get("attention_mask") if isinstance(x, dict) else None
    keep = (
        mask.reshape(-1) > 0
        if isinstance(mask, Tensor) and mask.numel() == logits.shape[0] * logits.shape[1]
        else None
    )
    rows = logits.reshape(-1, logits.shape[-1])
    teacher_rows = (
        teacher_logits.reshape(-1, logits.shape[-1]) if teacher_logits is not None else None
    )
    if keep is not None:
        rows = rows[keep]
        teacher_rows = teacher_rows[keep] if teacher_rows is not None else None
    return rows, teacher_rows


__all__ = ["check_token_batches", "is_causal_lm", "split_tokens", "token_rows"]
