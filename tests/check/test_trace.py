"""check/trace.py: how eq.check reads a model: torch.fx first (shape-made zeros are constants,
other factories are ops), forward hooks when fx cannot trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import by_op  # tests/toys.py

import edgequant as eq
from edgequant.check import REFUSE, REPLACE


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.act(self.fc(x))
        return self.act(self.fc(-x))


def test_untraceable_model_falls_back_to_hooks() -> None:
    result = eq.check(Dynamic(), "mcu-int8", torch.ones(2, 4))
    assert result.traced_with == "forward hooks"
    assert by_op(result) == {"tanh": REPLACE}
    assert any("functional ops" in n for n in result.notes)
    with pytest.raises(ValueError, match="pass example_inputs"):
        eq.check(Dynamic(), "mcu-int8")


@pytest.mark.parametrize("style", ["ZerosLikeShortcut", "ZerosShortcut", "NewZerosShortcut"])
def test_tensors_of_zeros_made_from_a_shape_are_not_computation(style: str) -> None:
    """zeros_like, torch.zeros(x.shape...) and new_zeros are counted as constants (fx traces
    all three: no fallback to hooks), and mcu-int8 takes the model."""
    import zoo

    model = getattr(zoo, style)().eval()
    result = eq.check(model, "mcu-int8", torch.randn(2, 3, 8, 8))
    assert result.traced_with == "torch.fx"
    assert result.ok and result.rows == []
    assert result.integer_ops["zeros (a constant: its zero point)"] == 1
    assert result.integer_ops["concat"] == 1


def test_other_tensor_factories_are_traced_and_refused_by_name() -> None:
    """torch.ones of a traced shape is followed by fx (before, the whole model fell back to
    hooks and the op went unseen) and, having no integer meaning here, refused by name."""

    class OnesShortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + torch.ones(x.shape[0], 3, x.shape[2], x.shape[3])

    result = eq.check(OnesShortcut(), "mcu-int8", torch.randn(2, 3, 4, 4))
    assert result.traced_with == "torch.fx"
    assert by_op(result) == {"ones": REFUSE}
