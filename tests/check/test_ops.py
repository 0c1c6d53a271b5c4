"""check/ops.py: the op tables eq.check reads; a module's op from its class, or from a hint in
its class name."""

from __future__ import annotations

import torch
from torch import nn
from toys import by_op  # tests/toys.py

import edgequant as eq
from edgequant.check import REPLACE
from edgequant.check.ops import module_op


class NewGELUActivation(nn.Module):
    """A library's own GELU class (as in transformers): known by its name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x**3)))


class Hooked(nn.Module):
    """Untraceable (data-dependent branch), with library activation classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():  # y = x: the branch taken is the input's sign
            self.fc.weight.copy_(torch.eye(4))
            self.fc.bias.zero_()
        self.act = NewGELUActivation()
        self.gate = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.act(y) if y.sum() > 0 else self.gate(y)


def test_library_activation_classes_are_known_by_name() -> None:
    result = eq.check(Hooked(), "mcu-int8", torch.ones(2, 4))
    assert result.traced_with == "forward hooks"
    assert by_op(result) == {"gelu": REPLACE}  # only the branch that ran
    result = eq.check(Hooked(), "mcu-int8", -torch.ones(2, 4))
    assert by_op(result) == {"hardswish": REPLACE}


def test_module_op_reads_the_tables_then_the_class_name() -> None:
    assert module_op(nn.Upsample(scale_factor=2, mode="bilinear")) == "upsample (bilinear)"
    assert module_op(nn.Hardswish()) == "hardswish"
    assert module_op(NewGELUActivation()) == "gelu"

    class Mystery(nn.Module):
        pass

    assert module_op(Mystery()) == "Mystery"


def test_pool_windows_are_whole_or_none() -> None:
    from edgequant.check.ops import pool_windows

    assert pool_windows([12], 3) == [4]
    assert pool_windows([8, 6], (2, None)) == [4, 1]  # None: the input's size
    assert pool_windows([8, 6], 1) == [8, 6]
    assert pool_windows([10], 3) is None
    assert pool_windows([8, 5], (2, 2)) is None


def test_bilinear_upsampling_is_refused_with_the_reason() -> None:
    """mcu-int8 refuses bilinear upsampling (align_corners False or True) saying why: TFLite's
    int8 RESIZE_BILINEAR interpolates in fixed point, which the simulation does not compute."""
    from edgequant.check import REFUSE

    for align in (False, True):
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align)
        model = nn.Sequential(nn.Conv2d(3, 4, 1), up, nn.Conv2d(4, 2, 1))
        [row] = eq.check(model, "mcu-int8", torch.randn(1, 3, 4, 4)).rows
        assert (row.node, row.op, row.action) == ("1", "upsample (bilinear)", REFUSE)
        assert "RESIZE_BILINEAR" in row.choice and "mode='nearest'" in row.choice
