"""Option-A shortcuts (strided subsampling, zero channel padding) written as exact 1x1
selection convolutions in the PT2E program that edge converters read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgequant as eq
from edgequant.export.pt2e import export_program, pt2e_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import (  # noqa: E402
    NewZerosShortcut,
    OptionAShortcut,
    ZerosLikeShortcut,
    ZerosShortcut,
    seeded_case,
)

SELECTION_OPS = {"slice", "pad", "constant_pad_nd", "cat", "max_pool2d", "max_pool1d", "zeros_like"}


class PoolPadShortcut(OptionAShortcut):
    """The zoo's option-A shortcut written another way: a 1x1 max pool module of stride 2, then
    the new channels padded with a negative-dimension torch.nn.functional.pad on a
    channels-first view."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(out + F.pad(self.pool(x), [0, 0, 0, 0, 0, 8]))
        return self.fc(out.mean((2, 3)))


class Conv1dShortcut(nn.Module):
    """A 1-D residual block whose shortcut is x[..., ::2] padded with zero channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 3, padding=1)
        self.conv = nn.Conv1d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        out = F.relu(self.conv(x) + F.pad(x[:, :, ::2], (0, 0, 2, 2)))
        return self.fc(out.mean(2))


class NotASelection(nn.Module):
    """Shapes like a shortcut but not a selection from index 0: left as written."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return self.conv(x) + x[:, :, 1::2, 1::2]


def _quantized(cls: type[nn.Module], shape: tuple[int, ...], target: str) -> tuple:
    model, calib = seeded_case(cls, shape)  # as the zoo builds its models
    recipe = eq.Recipe.preset("w8a8").for_target(target)
    return eq.quantize(model, recipe, calib, method="static"), calib


def _ops(program: torch.export.ExportedProgram) -> list[str]:
    return [
        str(getattr(n.target, "_opname", n.target))
        for n in program.graph.nodes
        if n.op == "call_function"
    ]


def _selection_convs(program: torch.export.ExportedProgram) -> list[list[int]]:
    """The strides of the convolutions that read a weight named selection_conv_*."""
    found = []
    for n in program.graph.nodes:
        if getattr(n.target, "_opname", "") in ("conv1d", "conv2d"):
            w = n.args[1].args[0]  # dequantize_per_channel(...) of the weight (or its quantize)
            while w.op == "call_function":
                w = w.args[0]
            if "selection_conv" in w.name:
                found.append(list(n.args[3]))
    return found


STYLES = {
    "slice_and_pad": lambda target: _quantized(OptionAShortcut, (3, 8, 8), target),
    "pool_and_pad": lambda target: _quantized(PoolPadShortcut, (3, 8, 8), target),
    "conv1d_slice_and_pad": lambda target: _quantized(Conv1dShortcut, (2, 12), target),
    "cat_zeros_like": lambda target: _quantized(ZerosLikeShortcut, (3, 8, 8), target),
    "cat_zeros_of_shape": lambda target: _quantized(ZerosShortcut, (3, 8, 8), target),
    "cat_new_zeros": lambda target: _quantized(NewZerosShortcut, (3, 8, 8), target),
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_shortcut_becomes_one_conv_that_computes_the_same(style: str) -> None:
    qmodel, calib = STYLES[style]("mcu-int8")
    pt2e = pt2e_model(qmodel)
    program = export_program(pt2e, (calib[0][:1],))
    assert _selection_convs(program) in ([[2, 2]], [[2]])
    assert not SELECTION_OPS & set(_ops(program))
    for x in calib[1]:  # bit for bit the PT2E model's outputs
        with torch.no_grad():
            assert torch.equal(program.module()(x[None]), pt2e(x[None]))


@pytest.mark.parametrize(
    "style",
    [
        "pool_and_pad",
        pytest.param("cat_zeros_of_shape", marks=pytest.mark.slow),
        pytest.param("conv1d_slice_and_pad", marks=pytest.mark.slow),
    ],
)
def test_shortcut_conv_runs_bit_exact_in_tflite_micro(style: str, tmp_path: Path) -> None:
    """export_tflite's own check: every output integer of TFLite Micro equals the integer
    reference's, which computes the shortcut as the slice and pad it is written as (the zoo's
    slice-and-pad model is exported in test_tflite.py)."""
    qmodel, calib = STYLES[style]("mcu-int8")
    info = eq.export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1], verify_data=calib)
    v = info.verification
    assert v.passed and v.bit_exact == 1.0 and v.max_step_difference == 0
    assert v.samples == 1 + sum(len(b) for b in calib)
    assert v.top1_agreement == 1.0
    assert "CONV_2D" in info.ops
    assert not {"STRIDED_SLICE", "MAX_POOL_2D", "CONCATENATION"} & set(info.ops)


def test_what_is_not_a_selection_from_index_zero_is_left_as_written() -> None:
    qmodel, calib = _quantized(NotASelection, (3, 8, 8), "mcu-int8")
    program = export_program(pt2e_model(qmodel), (calib[0][:1],))
    assert _selection_convs(program) == []
    assert _ops(program).count("slice") == 2


@pytest.mark.parametrize(
    "style", ["slice_and_pad", pytest.param("cat_new_zeros", marks=pytest.mark.slow)]
)
def test_resnet_option_a_block_exports_to_executorch(style: str, tmp_path: Path) -> None:
    """ExecuTorch 1.5.1's XNNPACK program computes this block wrongly with the shortcut as a
    slice outside the delegate (its own verification refuses it); as a selection conv it
    verifies."""
    qmodel, calib = STYLES[style]("executorch")
    program = export_program(pt2e_model(qmodel, int8_weights=True), (calib[0][:1],), True)
    assert _selection_convs(program) == [[2, 2]]
    info = eq.export_executorch(qmodel, tmp_path / "m.pte", calib[0][:1], verify_data=calib)
    v = info.verification
    assert v.passed and v.sqnr_db is not None and v.sqnr_db > 60
    assert v.top1_agreement == 1.0


class CatZerosPt2e(nn.Module):
    """A PT2E-form graph (quantize/dequantize pairs written out) whose shortcut is a stride-2
    slice concatenated with zeros on both sides, as convert_pt2e writes such a model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        grid = (0.05, -3, -128, 127, torch.int8)
        x = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, *grid), *grid)
        s = x[:, :, ::2, ::2]
        z = torch.zeros_like(s[:, :2])
        y = torch.cat([z, s, z], 1)
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(y, *grid), *grid)


@pytest.mark.parametrize("int8_weights", [False, True])
def test_concatenation_with_zeros_is_a_selection_too(int8_weights: bool) -> None:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    model = CatZerosPt2e()
    x = torch.randn(1, 3, 7, 5) * 3
    program = export_program(model, (x,), int8_weights)
    assert _selection_convs(program) == [[2, 2]]
    assert not SELECTION_OPS & set(_ops(program))
    got = program.module()(x)
    assert got.shape == (1, 7, 4, 3)
    assert torch.equal(got, model(x))
    assert torch.equal(got[:, :2], torch.zeros(1, 2, 4, 3))
