"""check/trace.py: how eq.check reads a model: torch.fx first (shape-made zeros are constants,
other factories are ops), forward hooks when fx cannot trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import AdaptivePools, by_op  # tests/toys.py

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


class DataDependent2d(nn.Module):
    """nn.AdaptiveMaxPool2d((2, 3)) behind a data-dependent branch (checked with hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) if x.sum() > 0 else self.pool(-x)


EDGE_TARGETS = ("mcu-int8", "tflite-int8", "executorch")


@pytest.mark.parametrize("target", EDGE_TARGETS)
@pytest.mark.parametrize(
    ("functional", "where"), [(True, "head (adaptive_max_pool1d)"), (False, "pool")]
)
def test_uneven_adaptive_max_pools_are_refused_with_the_layer(
    target: str, functional: bool, where: str
) -> None:
    model = AdaptivePools(functional).eval()
    result = eq.check(model, target, torch.randn(2, 2, 10))
    assert not result.ok
    [row] = [r for r in result.rows if r.action == REFUSE]
    assert (row.node, row.op) == (where, "adaptive_max_pool1d (uneven windows)")
    assert "input 10, output size 3" in row.choice and target in row.choice
    even = eq.check(model, target, torch.randn(2, 2, 12))
    assert even.ok and not any("adaptive" in r.op for r in even.rows)
    assert even.integer_ops["maxpool"] == 1


def test_uneven_adaptive_max_pools_are_fine_where_the_export_keeps_them() -> None:
    model = AdaptivePools(False).eval()
    for target in ("onnxruntime", "tensorrt", "dsp-pow2"):
        assert eq.check(model, target, torch.randn(2, 2, 10)).ok, target


def test_adaptive_max_pool_without_shapes_is_a_note() -> None:
    result = eq.check(AdaptivePools(True).eval(), "tflite-int8")
    assert result.ok
    assert any("adaptive_max_pool1d at 'head (adaptive_max_pool1d)'" in n for n in result.notes)
    assert any("pass example_inputs" in n for n in result.notes)


def test_uneven_adaptive_max_pool_is_refused_when_checked_with_hooks() -> None:
    uneven = eq.check(DataDependent2d(), "executorch", torch.randn(1, 3, 5, 6))
    assert uneven.traced_with == "forward hooks"
    assert [(r.node, r.op) for r in uneven.rows] == [
        ("pool", "adaptive_max_pool2d (uneven windows)")
    ]
    assert "input 5x6, output size (2, 3)" in uneven.rows[0].choice
    assert eq.check(DataDependent2d(), "executorch", torch.randn(1, 3, 4, 6)).ok
