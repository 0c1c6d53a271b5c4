"""Bias correction (ptq/bias_correction.py) restores the output means rounding moved, and leaves
padded tokens out of them."""

from __future__ import annotations

import torch
from torch import nn
from toys import Chain, chain_batches, quantize_chain  # tests/toys.py

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


def test_static_bias_correction_reads_the_mask_and_weight_only_does_not(monkeypatch) -> None:
    import edgequant as eq
    import edgequant.ptq.bias_correction as BC
    import edgequant.ptq.static as S

    calls: list[str] = []

    def spy(batch):  # type: ignore[no-untyped-def]
        calls.append("mask")
        return None

    monkeypatch.setattr(BC, "token_mask", spy)
    monkeypatch.setattr(S, "token_mask", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [torch.randn(16, 8) for _ in range(2)]
    recipe = eq.Recipe.preset("w4-weight-only").replace(rounding="nearest", bias_correction=True)
    eq.quantize(model, recipe, data, method="weight_only")
    assert calls == []  # weight-only: every position (held-out choice on MiniLM)
    recipe = eq.Recipe.preset("w4a8").replace(rounding="nearest", bias_correction=True)
    eq.quantize(model, recipe, data, method="static")
    assert calls  # static: padded tokens left out


def test_bias_correction_restores_output_means() -> None:
    model = Chain().eval()
    data = chain_batches()
    off = quantize_chain(model, "w3a8", rounding="nearest", bias_correction=False)
    on = quantize_chain(model, "w3a8", rounding="nearest", bias_correction=True)
    x = torch.cat(data)
    with torch.no_grad():
        ref = model(x).mean(0)
        err_off = float((off(x).mean(0) - ref).abs().mean())
        err_on = float((on(x).mean(0) - ref).abs().mean())
    assert err_on < err_off
