"""graph_quantizers/pools.py: adaptive max pools of whole windows traced as the max pools they
are, so fully integer exports need no float reduction."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as torch_F
from torch import nn

import edgequant as eq


class GlobalMaxPool1d(nn.Module):
    """Conv1d pooled over time by F.adaptive_max_pool1d(x, 1) (ONNX: ReduceMax, left as written)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch_F.adaptive_max_pool1d(torch_F.relu(self.conv(x)), 1).squeeze(-1))


def test_a_global_adaptive_max_pool_exports_fully_integer_and_bit_exact(tmp_path: Path) -> None:
    """F.adaptive_max_pool1d(x, 1) is traced as the max pool of one window (MaxPool in ONNX, not
    Unsqueeze -> ReduceMax -> Squeeze), so the fully integer ONNX export, which export_tflite
    takes as its reference, has no float edge; the .tflite is bit-exact in TFLite Micro."""
    from edgequant.graph_quantizers.pools import window_max_pool

    torch.manual_seed(0)
    calib = [torch.randn(4, 2, 16) for _ in range(2)]
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    qmodel = eq.quantize(GlobalMaxPool1d().eval(), recipe, calib)
    assert any(n.target is window_max_pool for n in qmodel.graph.nodes)  # type: ignore[union-attr]
    onnx_info = eq.export_onnx(qmodel, tmp_path / "g.onnx", calib[0], verify_data=calib[1:])
    assert onnx_info.fully_integer is True
    info = eq.export_tflite(qmodel, tmp_path / "g.tflite", calib[0][:1], verify_data=calib)
    assert info.verification.bit_exact == 1.0 and "MAX_POOL_2D" in info.ops
