"""batches.removing_hooks: the hooks are gone after the block, whether it ends or raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgequant.batches import call_model, in_eval_mode, removing_hooks


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


def test_in_eval_mode_restores_every_training_flag_even_on_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model[1].eval()  # mixed flags: the Sequential and the Linear train, the Dropout does not
    with pytest.raises(RuntimeError, match="inside"), in_eval_mode(model) as same:
        assert same is model
        assert not any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, False]
