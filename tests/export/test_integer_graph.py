"""mcu-int8 on models that reshape their float input before the first layer (the input is
quantized first: quantize_inputs_first) or upsample by nearest neighbour: the graph is fully
integer, and the integer runner computes what ONNX Runtime computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgequant as eq
from edgequant.export.integer import run_integer
from edgequant.export.integer_graph import fully_integer_violations

ort = pytest.importorskip("onnxruntime")


class FlattenFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(48, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def test_input_reshaped_before_the_first_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 4, 4, generator=gen) for _ in range(2)]
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    qmodel = eq.quantize(FlattenFirst().eval(), recipe, data)
    path = tmp_path / "m.onnx"
    # Before: "node 'node_Reshape_11' (Reshape) reads float tensor 'x' from the graph input".
    info = eq.export_onnx(qmodel, path, data[0], verify_data=data[1:])
    assert info.fully_integer is True
    assert fully_integer_violations(path) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = data[1].numpy()
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_array_equal(run_integer(path, x), expected)


class UpsampleSkip(nn.Module):
    """Downsample, nearest upsampling (module and functional), concatenation skip."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.enc(x))
        down = F.relu(self.down(skip))
        x = torch.cat([self.up(down), skip], dim=1)
        x = F.relu(self.dec(x))
        return F.interpolate(x, scale_factor=2, mode="nearest")


def test_nearest_upsampling_is_integer(tmp_path: Path) -> None:
    """Nearest upsampling moves integers: checked as integer, exported fully integer (its
    scales are a parameter, not data), and run by the integer runner as ONNX Runtime runs it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)]
    model = UpsampleSkip().eval()
    result = eq.check(model, "mcu-int8", data[0])
    assert result.ok and result.integer_ops["upsample (nearest)"] == 2
    bilinear = nn.Upsample(scale_factor=2, mode="bilinear")
    assert not eq.check(nn.Sequential(bilinear), "mcu-int8", data[0]).ok
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    qmodel = eq.quantize(model, recipe, data)  # before: refused, "op 'Upsample' at 'up'"
    path = tmp_path / "m.onnx"
    info = eq.export_onnx(qmodel, path, data[0], verify_data=data[1:])
    assert info.fully_integer is True
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = data[1].numpy()
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert expected.shape == (4, 4, 16, 16)
    out = run_integer(path, x)
    assert isinstance(out, np.ndarray)
    # Each 2x2 block repeats one value: nearest upsampling, on the integers.
    block = out[..., ::2, ::2]
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        np.testing.assert_array_equal(out[..., dy::2, dx::2], block)
    # ONNX Runtime's float requantization may round exact ties differently (integer.py), and a
    # step moved at the concatenation moves the 3x3 conv after it: 0.6 % of the values differed
    # on an AVX2 CPU; none on an AVX-512 one.
    assert (out != expected).mean() < 0.02
    noise = float(((out - expected) ** 2).sum())
    assert noise == 0 or 10 * np.log10(float((expected**2).sum()) / noise) > 30
