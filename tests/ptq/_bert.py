"""A tiny random BERT and tokenizer-like batches, shared by the transformer PTQ tests (the tests
plant their own outliers in it)."""

from __future__ import annotations

from typing import Any

import torch

HIDDEN, LAYERS, VOCAB, FFN = 32, 2, 64, 64


def random_bert() -> torch.nn.Module:
    """A 2-layer BertModel with seeded random weights, in eval mode."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=FFN,
        max_position_embeddings=64,
        attn_implementation="eager",
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def batches(lengths: list[int], batch: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Tokenizer-like batches, padded per batch (the last sentence of each is shorter)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[-1, length // 2 :] = 0
        ids[-1, length // 2 :] = 0
        out.append(
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        )
    return out


def hidden(model: Any, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Every token's last hidden state, (tokens, HIDDEN)."""
    with torch.no_grad():
        return torch.cat([model(**b).last_hidden_state.flatten(0, 1) for b in data])
