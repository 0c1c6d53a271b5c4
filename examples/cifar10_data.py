"""Data factories for cifar10_resnet20.yaml: CIFAR-10 from the shared folder, in batches.

The config names these functions ("cifar10_data:calib_batches"); edgequant imports this file
from the config's folder. The images come from edgequant.examples.cifar10, which finds the
shared folder (../shared, or the EDGEQUANT_SHARED environment variable).
"""

from __future__ import annotations

import torch

from edgequant.examples import cifar10


def calib_batches(n: int = 512, batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """``n`` calibration images (never the held-out or test images), shuffled by ``seed``."""
    images, _ = cifar10.calibration_split(n, seed)
    return list(images.split(batch_size))


def eval_batches(batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of the 932 stored test images."""
    images, labels = cifar10.load_split("test_932")
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))


def train_batches(batch_size: int = 128, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of the 4000-image training part, shuffled by ``seed`` (QAT)."""
    images, labels = cifar10.train_split()
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))
