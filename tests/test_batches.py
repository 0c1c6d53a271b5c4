"""batches.removing_hooks: the hooks are gone after the block, whether it ends or raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgequant.batches import call_model, removing_hooks


def test_hooks_are_removed_after_the_block_and_after_an_error() -> None:
    model = nn.Linear(3, 2)
    calls: list[int] = []
    handles = [model.register_forward_hook(lambda m, i, o: calls.append(1))]
    with removing_hooks(handles):
        call_model(model, torch.zeros(1, 3))
    assert calls == [1] and not model._forward_hooks
    call_model(model, torch.zeros(1, 3))
    assert calls == [1]

    handles = [model.register_forward_hook(lambda m, i, o: calls.append(2))]
    with pytest.raises(RuntimeError, match="mat1 and mat2"), removing_hooks(handles):
        call_model(model, torch.zeros(1, 4))
    assert not model._forward_hooks
