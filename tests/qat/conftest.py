"""Tiny models and data for the QAT tests: a conv net with BatchNorm and residual joins, one
through a strided slice and zero padding as in ResNet-20 (so BN folding and graph-level
quantizers, one applied several times per forward, are exercised), on 8x8 inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgequant.qat import prepare_qat


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, 4)
        self.slice_join = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + out)
        # ResNet-20's option-A shortcut: the join re-applies one quantizer after the slice and pad.
        if self.slice_join:
            shortcut = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
            out = F.relu(self.bn3(self.conv3(out)) + shortcut)
        else:
            out = F.relu(self.bn3(self.conv3(out)))
        return self.linear(F.avg_pool2d(out, out.shape[-1]).flatten(1))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    # A learnable rule, so training has a direction: the label is the argmax of 4 channel sums.
    y = torch.stack(
        [x[:, 0].mean((1, 2)), x[:, 1].mean((1, 2)), x[:, 2].mean((1, 2)), -x.mean((1, 2, 3))],
        dim=1,
    ).argmax(1)
    return x, y


@pytest.fixture(scope="session")
def _trained_tiny() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _train_tiny()


@pytest.fixture
def tiny_model(_trained_tiny: nn.Module) -> nn.Module:
    """A briefly trained TinyNet in eval mode (BN running statistics set); a fresh copy."""
    return copy.deepcopy(_trained_tiny).eval()


def _train_tiny() -> nn.Module:
    model = TinyNet()
    x, y = _data(256, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for i in range(0, 256, 32):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    return model.eval()


@pytest.fixture
def calib() -> list[torch.Tensor]:
    return list(_data(64, seed=2)[0].split(32))


@pytest.fixture
def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data(96, seed=3)
    return list(zip(x.split(32), y.split(32), strict=True))


@pytest.fixture
def make_data() -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    return _data


def _sgd_steps(
    model: nn.Module,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float = 0.05,
    after_step: Callable[[], None] | None = None,
) -> None:
    """One plain SGD step per (x, y) batch on the cross-entropy: the training loop the tests that
    only need "some QAT steps" share. after_step runs after every step (checks on the grids)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step()


@pytest.fixture
def sgd_steps() -> Callable[..., None]:
    """_sgd_steps, for tests that need a few plain QAT steps."""
    return _sgd_steps


@pytest.fixture
def qat(tiny_model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    """tiny_model prepared for W8A8 QAT, for the tests of fit_qat's argument checks."""
    return prepare_qat(tiny_model, "w8a8", calib)
