"""A concatenation with tensors of zeros (zeros_like, torch.zeros of a traced shape, new_zeros)
is quantized and exported as the zero padding it is, on the fully integer target too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (  # tests/zoo.py
    NewZerosShortcut,
    OptionAShortcut,
    ZerosLikeShortcut,
    ZerosShortcut,
    _randomize_norms,
)

import edgequant as eq
from edgequant.graph_quantizers.zeros import zero_pads

STYLES = {"zeros_like": ZerosLikeShortcut, "zeros": ZerosShortcut, "new_zeros": NewZerosShortcut}


def _quantized(cls: type[nn.Module], target: str = "mcu-int8") -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = cls()
    _randomize_norms(model)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)]
    recipe = eq.Recipe.preset("w8a8").for_target(target)
    return eq.quantize(model.eval(), recipe, calib, method="static"), calib


def test_zero_pads_puts_the_zeros_where_the_concatenation_did() -> None:
    x = torch.randn(2, 3, 4, 5)
    for dim in (1, -3, 2, 3, -1):
        before = [b.narrow(dim, 0, 2) for b in [torch.zeros_like(x)]]
        after = [torch.zeros_like(x), torch.zeros_like(x).narrow(dim, 0, 1)]
        got = F.pad(x, zero_pads(x, before, after, dim))
        assert torch.equal(got, torch.cat([*before, x, *after], dim))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_each_style_is_quantized_as_the_padding_it_is(style: str) -> None:
    """No concatenation left in the quantized graph; where the zeros sit where F.pad puts them
    (torch.zeros on both sides), the quantized model is the zero-padding model, bit for bit."""
    qmodel, calib = _quantized(STYLES[style])
    graph = qmodel.graph  # type: ignore[union-attr]
    calls = [n.target for n in graph.nodes if n.op == "call_function"]
    assert torch.cat not in calls and F.pad in calls
    notes = " ".join(qmodel.quant_summary.notes)  # type: ignore[union-attr]
    assert "left in float" not in notes and "could not trace" not in notes
    if style == "zeros":
        padded, _ = _quantized(OptionAShortcut)
        with torch.no_grad():
            assert torch.equal(qmodel(calib[1]), padded(calib[1]))


@pytest.mark.parametrize(
    ("style", "target"),
    [("zeros_like", "mcu-int8"), ("zeros", "mcu-int8"), ("new_zeros", "onnxruntime")],
)
def test_each_style_exports_and_verifies_in_onnx_runtime(
    style: str, target: str, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    qmodel, calib = _quantized(STYLES[style], target)
    info = eq.export_onnx(qmodel, tmp_path / "m.onnx", calib[0], verify_data=calib[1:])
    assert info.verification.passed and info.verification.top1_agreement == 1.0
    if target == "mcu-int8":
        assert info.fully_integer is True


def test_a_concatenation_of_two_tensors_with_zeros_is_left_as_written() -> None:
    class TwoAndZeros(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.a(x)
            return torch.cat([a, torch.zeros_like(a), self.b(x)], 1)

    qmodel = eq.quantize(
        TwoAndZeros().eval(),
        eq.Recipe.preset("w8a8").for_target("onnxruntime"),
        [torch.randn(2, 3, 4, 4)],
        method="static",
    )
    calls = [n.target for n in qmodel.graph.nodes if n.op == "call_function"]  # type: ignore[union-attr]
    assert torch.cat in calls and F.pad not in calls
