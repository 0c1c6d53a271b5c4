"""Bias correction leaves padded tokens out of its output means."""

from __future__ import annotations

import torch
from torch import nn

from edgequant.ptq.bias_correction import channel_mean, token_mask


def test_channel_mean_skips_masked_tokens() -> None:
    layer = nn.Linear(3, 2)
    y = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    got = channel_mean(layer, y, mask)
    want = y.reshape(-1, 2)[mask.reshape(-1).bool()].double().mean(dim=0)
    assert torch.allclose(got, want)
    assert not torch.allclose(got, channel_mean(layer, y))  # padding moves the plain mean
    # A mask that does not match the output's (batch, tokens) is not applied.
    assert torch.equal(channel_mean(layer, y, torch.ones(3, 4)), channel_mean(layer, y))


def test_token_mask_reads_tokenizer_batches_only() -> None:
    mask = torch.ones(2, 5, dtype=torch.long)
    assert token_mask({"input_ids": mask, "attention_mask": mask}) is mask
    assert token_mask(torch.ones(2, 5)) is None
    assert token_mask({"input_ids": mask}) is None
    assert token_mask((mask, mask)) is None
