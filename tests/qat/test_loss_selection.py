"""The causal LM's choice of the epoch kept (qat/loss_selection.py): by held-out per-sequence
NLL, lower is better, an epoch replacing the start only beyond noise."""

from __future__ import annotations

import pytest
import torch

from edgequant.qat.loss_selection import select_epoch_by_loss


def test_select_epoch_by_loss_needs_a_gain_above_noise() -> None:
    start = torch.tensor([2.0, 2.1, 1.9, 2.0])
    clear = [start, start - 0.5, start - 0.3]
    kept, why = select_epoch_by_loss(clear)
    assert kept == 1 and "kept epoch 1" in why
    noisy = [start, start + torch.tensor([-0.2, 0.2, -0.2, 0.1])]
    kept, why = select_epoch_by_loss(noisy)
    assert kept == 0 and "noise" in why
    worse = [start, start + 0.1]
    assert select_epoch_by_loss(worse)[0] == 0
    with pytest.raises(ValueError, match=r"losses\[1\]"):
        select_epoch_by_loss([start, start.long()])
