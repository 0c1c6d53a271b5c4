"""Helpers and toy models that several test modules share (import them as `from toys import ...`;
tests/conftest.py puts this folder on sys.path). The zoo of architectures written in many styles
is tests/zoo.py."""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import nn


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator, so a test's random data does not depend on the tests before it."""
    return torch.Generator().manual_seed(seed)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (float32 compared as int32: -0.0 != 0.0, NaN == same NaN)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool((a.view(torch.int32) == b.view(torch.int32)).all())
    )


class TinyResidual(nn.Module):
    """A toy residual block on 4 channels: F.relu and an add of the block's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch_F.relu(self.conv1(x))
        y = torch_F.relu(self.conv2(y) + x)
        return self.fc(y.mean((2, 3)))


class SmallResNet(nn.Module):
    """conv-bn-relu, a residual block, pooling and a linear head: a small ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch_F.relu(self.bn(self.stem(x)))
        y = self.conv2(torch_F.relu(self.conv1(x)))
        x = torch_F.relu(x + y)
        return self.head(torch_F.adaptive_avg_pool2d(x, 1).flatten(1))
