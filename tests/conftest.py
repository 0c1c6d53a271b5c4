"""Shared fixtures. Tests that need real data or weights depend on ``shared`` and skip without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from edgequant.examples import cifar10
from edgequant.examples.shared import shared_dir

# tests/toys.py and tests/zoo.py are imported by name from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Under pytest-xdist each worker gets one intra-op thread: the workers share the cores, and
# two threads per worker on two cores would only contend.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

SKIP_REASON = (
    "../shared is absent: CIFAR-10 data and ResNet-20 weights are needed for this test "
    "(set EDGEQUANT_SHARED)"
)


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared folder with data/ and models/; skips the test when it cannot be found."""
    path = shared_dir()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture
def resnet20(shared: Path) -> torch.nn.Module:
    """The pretrained CIFAR-10 ResNet-20, eval mode; a fresh copy per test, free to modify."""
    return cifar10.load_resnet20()


@pytest.fixture
def cifar_test_932(shared: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 932 CIFAR-10 test images, preprocessed (N, 3, 32, 32), and int64 labels."""
    return cifar10.load_split("test_932")


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """For checks that belong before any export work: reaching torch.onnx.export fails the test."""

    def exporter_reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.onnx.export was reached: the input was not refused first")

    monkeypatch.setattr(torch.onnx, "export", exporter_reached)
