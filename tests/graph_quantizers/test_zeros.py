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
from edgequant.graph_quantizers.zeros import cats_with_zeros_as_pads, is_zeros, zero_pads

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


class TwoAndZeros(nn.Module):
    """Two convolutions concatenated with a tensor of zeros between them, then a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.head(torch.cat([a, torch.zeros_like(a), self.b(x)], 1))


@pytest.mark.parametrize("layout", ["a z b", "z a b z", "a b z z", "z z a b", "a z z b z"], ids=str)
@pytest.mark.parametrize("dim", [1, -1])
def test_a_concatenation_of_several_tensors_with_zeros_becomes_pads(layout: str, dim: int) -> None:
    """Each run of zeros pads the tensor before it (a leading run the first tensor): the same
    values, and no tensor of zeros left for the concatenation to read."""
    widths = {"a": 2, "b": 3}

    class Cat(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            parts = []
            for name in layout.split():
                if name == "z":
                    parts.append(torch.zeros_like(a))
                else:
                    parts.append(a if name == "a" else b)
            return torch.cat(parts, dim)

    gm = torch.fx.symbolic_trace(Cat())
    assert cats_with_zeros_as_pads(gm) == 1
    gm.recompile()
    shape = [2, 3, 4, 4]
    shape[dim] = widths["a"]
    a = torch.randn(shape)
    shape[dim] = widths["b"]
    b = torch.randn(shape)
    assert torch.equal(gm(a, b), Cat()(a, b))
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    for cat in cats:
        assert not any(is_zeros(t) for t in cat.args[0])


@pytest.fixture(scope="module")
def two_and_zeros() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = TwoAndZeros().eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 4, 4, generator=gen) for _ in range(2)]
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target("mcu-int8"), calib)
    return model, qmodel, calib


def test_two_tensors_with_zeros_pass_check_and_export_fully_integer(
    two_and_zeros: tuple, tmp_path: Path
) -> None:
    """What eq.check accepts for mcu-int8, the export writes: a fully integer ONNX file."""
    pytest.importorskip("onnxruntime")
    model, qmodel, calib = two_and_zeros
    result = eq.check(model, "mcu-int8", calib[0])
    assert result.ok and not result.rows
    calls = [n.target for n in qmodel.graph.nodes if n.op == "call_function"]
    assert F.pad in calls and calls.count(torch.cat) == 1
    info = eq.export_onnx(qmodel, tmp_path / "m.onnx", calib[0], verify_data=calib[1:])
    assert info.verification.passed and info.fully_integer is True


def test_two_tensors_with_zeros_run_bit_exact_in_tflite_micro(
    two_and_zeros: tuple, tmp_path: Path
) -> None:
    """The layer only the concatenation reads is quantized onto the concatenation's grid (as
    TFLite's converter writes it), so TFLite Micro computes what was simulated, bit for bit."""
    _, qmodel, calib = two_and_zeros
    info = eq.export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1], verify_data=calib)
    assert info.verification.bit_exact == 1.0 and "CONCATENATION" in info.ops
    assert "PAD" not in info.ops  # the zero channels: a selection convolution


@pytest.mark.slow
def test_two_tensors_with_zeros_run_in_executorch(two_and_zeros: tuple, tmp_path: Path) -> None:
    """XNNPACK takes a concatenation whose inputs are on its output grid (it refuses to load
    one whose inputs differ): the program loads, runs and verifies."""
    _, qmodel, calib = two_and_zeros
    info = eq.export_executorch(qmodel, tmp_path / "m.pte", calib[0][:1], verify_data=calib)
    assert info.verification.passed and info.verification.sqnr_db >= 30.0
