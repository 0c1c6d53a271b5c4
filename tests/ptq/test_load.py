"""eq.load: a quantized model saved with torch.save(state_dict) comes back computing the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn

import edgequant as eq


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch_F.relu(self.bn(self.conv(x)))
        x = torch_F.relu(x + self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return (
        Block().eval(),
        [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)],
        torch.randn(16, 3, 8, 8, generator=g),
    )


@pytest.mark.parametrize(
    ("preset", "method"),
    [
        ("w8a8", "static"),
        ("w4a4", "static"),
        ("w4-weight-only", "weight_only"),
        ("w8a8", "dynamic"),
    ],
)
def test_saved_and_loaded_model_computes_the_same(tmp_path: Path, preset: str, method: str) -> None:
    model, calib, test = _data()
    recipe = eq.Recipe.preset(preset)
    if method == "dynamic":
        recipe = recipe.replace(smooth_alpha=0.5)  # a buffer that exists only after smoothing
    qmodel = eq.quantize(model, recipe, calib, method=method)
    path = tmp_path / "q.pt"
    torch.save(qmodel.state_dict(), path)
    loaded = eq.load(model, recipe, path, calib[0], method=method)
    with torch.no_grad():
        assert torch.equal(qmodel(test), loaded(test))


def test_load_refuses_a_state_from_another_recipe(tmp_path: Path) -> None:
    model, calib, _ = _data()
    state = eq.quantize(model, "w8a8", calib, method="dynamic").state_dict()
    with pytest.raises(ValueError, match="does not fit"):
        eq.load(model, "w8a8", state, calib[0], method="static")
    with pytest.raises(FileNotFoundError, match="no saved state"):
        eq.load(model, "w8a8", tmp_path / "missing.pt", calib[0])
    with pytest.raises(ValueError, match="unknown method"):
        eq.load(model, "w8a8", state, calib[0], method="qat")
