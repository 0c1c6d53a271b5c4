"""mcu-int8 on a model that reshapes its float input before the first layer: the input is
quantized first (quantize_inputs_first), the graph is fully integer, and the integer runner
computes what ONNX Runtime computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgequant as eq
from edgequant.export.integer import fully_integer_violations, run_integer

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
