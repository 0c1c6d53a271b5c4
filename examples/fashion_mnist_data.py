"""Data and model factories for fashion_mnist.yaml: Fashion-MNIST from Debian's
`dataset-fashion-mnist` package (`apt install dataset-fashion-mnist`: the IDX files under
/usr/share/datasets/fashion-mnist; FASHION_MNIST_DIR overrides the folder) and a small CNN trained
on it once (cached in ~/.cache/edgequant, written atomically).

Splits: calibration and QAT images come from the first 55,000 training images; the last 5,000
are held out for choosing settings; the metric is measured on the 10,000 test images.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgequant._io import atomic_path

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
TRAIN_PART = 55_000


def data_dir() -> Path:
    path = Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {path}: install Debian's dataset-fashion-mnist package "
            "(apt install dataset-fashion-mnist) or set FASHION_MNIST_DIR to a folder holding "
            "train-images-idx3-ubyte.gz and the other three IDX files"
        )
    return path


def _idx(name: str) -> np.ndarray:
    with gzip.open(data_dir() / name, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 28, 28) float32 normalised, labels int64) of "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}[split]
    x = torch.from_numpy(_idx(f"{prefix}-images-idx3-ubyte.gz").copy()).float().div(255.0)
    y = torch.from_numpy(_idx(f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    return ((x - 0.2860) / 0.3530).unsqueeze(1), y


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def trained_cnn(epochs: int = 3, seed: int = 0) -> nn.Module:
    """The CNN trained on the first 55,000 training images (cached after the first call)."""
    cache = Path(os.environ.get("EDGEQUANT_CACHE", Path.home() / ".cache" / "edgequant"))
    path = cache / f"fashion_mnist_cnn_e{epochs}_s{seed}.pt"
    torch.manual_seed(seed)
    model = SmallCNN()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    x, y = load("train")
    x, y = x[:TRAIN_PART], y[:TRAIN_PART]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for idx in order.split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model


def calib_batches(n: int = 512, batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    x, _ = load("train")
    order = torch.randperm(TRAIN_PART, generator=torch.Generator().manual_seed(seed))[:n]
    return list(x[order].split(batch_size))


def train_batches(
    n: int = 10_000, batch_size: int = 128, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = load("train")
    order = torch.randperm(TRAIN_PART, generator=torch.Generator().manual_seed(seed))[:n]
    return list(zip(x[order].split(batch_size), y[order].split(batch_size), strict=True))


def heldout_batches(batch_size: int = 500) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = load("train")
    return list(
        zip(x[TRAIN_PART:].split(batch_size), y[TRAIN_PART:].split(batch_size), strict=True)
    )


def eval_batches(batch_size: int = 500) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = load("test")
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))
