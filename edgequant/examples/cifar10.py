"""CIFAR-10 and a pretrained ResNet-20: the real task behind the tests and benchmarks.

Data and weights live in the shared folder (see :mod:`edgequant.examples.shared`):

- ``data/cifar10/test_932.npz``: the first 932 official test images, pixel-exact;
- ``data/cifar10/train_4660.npz``: the first 932 images of each of the 5 training batches;
  its first 4000 images are the calibration / training part, its last 660 the held-out part
  (for choosing settings; never used to calibrate or train);
- ``data/cifar10/test_jpeg_q75_10000.zip``: all 10,000 test images as JPEG quality 75 (lossy);
- ``models/cifar10_resnet20/resnet20-12fca82f.th``: ResNet-20 (Idelbayev,
  akamaster/pytorch_resnet_cifar10, BSD-2-Clause), 91.63 % on test_932.

ResNet-20 is He et al., "Deep Residual Learning for Image Recognition", 2016, section 4.2, with
option-A (parameter-free) shortcuts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgequant._io import atomic_path
from edgequant.batches import in_eval_mode
from edgequant.examples.shared import require_shared

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 10

WEIGHTS = "models/cifar10_resnet20/resnet20-12fca82f.th"
SPLITS = {"train_4660": "data/cifar10/train_4660.npz", "test_932": "data/cifar10/test_932.npz"}
JPEG_ZIP = "data/cifar10/test_jpeg_q75_10000.zip"
TEST_LABELS = "data/cifar10/test_labels_10000.npy"
# train_4660: images [0, 4000) calibrate and train, [4000, 4660) choose settings.
CALIBRATION_SIZE = 4000
HELDOUT_SIZE = 660
_JPEG_NAME = re.compile(r"^(?:.*/)?(\d{5})_(\d)\.jpg$")

PredictFn = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------- model


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 in H and W, then zero-pad ``pad`` channels each side.

    A module rather than the original lambda so the model deep-copies and pickles. The strided
    slice keeps ceil(H/2) rows, exactly what the stride-2 3x3 convolution (padding 1) of the
    residual branch produces, so odd sizes line up too.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs and a shortcut; ReLU after the first pair and after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out of place (the original adds in place): same numbers, and graph rewrites and
        # autograd through quantizers never see a mutated activation.
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 CIFAR-10 images: 0.27M parameters, input NCHW normalised."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 3, stride=1)
        self.layer2 = self._make_layer(32, 3, stride=2)
        self.layer3 = self._make_layer(64, 3, stride=2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


def resnet20(num_classes: int = NUM_CLASSES) -> ResNet20:
    """A randomly initialised ResNet-20."""
    return ResNet20(num_classes)


def load_resnet20(path: str | os.PathLike[str] | None = None) -> ResNet20:
    """The pretrained ResNet-20 in eval mode, on CPU.

    ``path`` defaults to the checkpoint in the shared folder. Keys may carry the ``module.``
    prefix of ``nn.DataParallel``; the checkpoint may be the full dict or its ``state_dict``.
    """
    if path is None:
        ckpt_path = require_shared(WEIGHTS)
    else:
        ckpt_path = Path(path)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"ResNet-20 checkpoint not found: {ckpt_path}")
    # The file was saved from CUDA tensors: without map_location, a CPU-only torch refuses it.
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = ResNet20()
    # The checkpoint predates BatchNorm's num_batches_tracked; BN fills it in (version < 2).
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------- data


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB images NHWC -> float32 NCHW, ``x / 255`` then per-channel MEAN / STD."""
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        raise TypeError(f"images must be a numpy array or a tensor, got {type(images).__name__}")
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 of shape (N, H, W, 3), got {x.dtype} {tuple(x.shape)}"
        )
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return ((x - mean) / std).contiguous()


def _load_uint8(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {sorted(SPLITS)}")
    with np.load(require_shared(SPLITS[name])) as data:
        return data["images"], data["labels"].astype(np.int64)


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored split, ``"train_4660"`` or ``"test_932"``: (images float NCHW, labels int64)."""
    images, labels = _load_uint8(name)
    return preprocess(images), torch.from_numpy(labels)


def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration / training part of train_4660: its first 4000 images, in stored order."""
    images, labels = _load_uint8("train_4660")
    return (
        preprocess(images[:CALIBRATION_SIZE]),
        torch.from_numpy(labels[:CALIBRATION_SIZE]),
    )


def calibration_split(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` calibration images: the first ``n`` of the 4000-image part, shuffled by ``seed``.

    The same seed gives nested sets: ``calibration_split(256)`` is the start of
    ``calibration_split(512)``. The held-out part is never included.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= CALIBRATION_SIZE:
        raise ValueError(f"n must be an int in [1, {CALIBRATION_SIZE}], got {n!r}")
    images, labels = _load_uint8("train_4660")
    order = np.random.default_rng(seed).permutation(CALIBRATION_SIZE)[:n]
    return preprocess(images[order]), torch.from_numpy(labels[order])


def heldout_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The last 660 images of train_4660: for choosing settings, never for calibration."""
    images, labels = _load_uint8("train_4660")
    return (
        preprocess(images[CALIBRATION_SIZE:]),
        torch.from_numpy(labels[CALIBRATION_SIZE:]),
    )


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"quality must be an int in [1, 95], got {quality!r}")


def jpeg_roundtrip(images: np.ndarray, quality: int = 75) -> np.ndarray:
    """uint8 RGB images NHWC, each JPEG-compressed at ``quality`` (Pillow) and decoded."""
    from PIL import Image

    _check_quality(quality)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


def heldout_jpeg_split(quality: int = 75) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out images of heldout_split, each JPEG-compressed at ``quality`` (Pillow) and
    decoded, then the same images mirrored: 1,320 inputs that carry the JPEG test set's kind of
    noise without touching a test image. For choices judged against the JPEG test set; FP32 is
    near 87 % here, where it has memorized the clean held-out images (99.7 %)."""
    _check_quality(quality)
    images, labels = _load_uint8("train_4660")
    x = preprocess(jpeg_roundtrip(images[CALIBRATION_SIZE:], quality))
    y = torch.from_numpy(labels[CALIBRATION_SIZE:])
    return torch.cat([x, x.flip(-1)]), torch.cat([y, y])


def uncalibrated_jpeg_split(
    n: int, seed: int = 0, quality: int = 75
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of the 4000-image part that ``calibration_split(n, seed)`` leaves out, then
    the held-out images, each JPEG-compressed at ``quality`` and mirrored as in
    heldout_jpeg_split: 2 x (4660 - n) inputs. All of train_4660 was in the FP32 model's
    training set, so for a model quantized from those ``n`` images the rest are as unseen as the
    held-out part: a judge 5.5 times the held-out one at n = 1024 (never a test image). Not for
    choices about QAT, which trains on the whole 4000-image part."""
    _check_quality(quality)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < CALIBRATION_SIZE:
        raise ValueError(f"n must be an int in [1, {CALIBRATION_SIZE - 1}], got {n!r}")
    images, labels = _load_uint8("train_4660")
    order = np.random.default_rng(seed).permutation(CALIBRATION_SIZE)[n:]
    keep = np.concatenate([np.sort(order), np.arange(CALIBRATION_SIZE, len(images))])
    x = preprocess(jpeg_roundtrip(images[keep], quality))
    y = torch.from_numpy(labels[keep])
    return torch.cat([x, x.flip(-1)]), torch.cat([y, y])


def train_jpeg_split(quality: int = 75) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of train_split, each JPEG-compressed at ``quality`` and decoded, in the same
    order: a training augmentation for models deployed on JPEG-compressed inputs."""
    _check_quality(quality)
    images, labels = _load_uint8("train_4660")
    return (
        preprocess(jpeg_roundtrip(images[:CALIBRATION_SIZE], quality)),
        torch.from_numpy(labels[:CALIBRATION_SIZE]),
    )


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "edgequant"


def _decode_jpeg_zip(zip_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with zipfile.ZipFile(zip_path) as archive:
        entries = []
        for name in archive.namelist():
            match = _JPEG_NAME.match(name)
            if match:
                entries.append((int(match.group(1)), int(match.group(2)), name))
        entries.sort()
        indices = [index for index, _, _ in entries]
        if indices != list(range(len(indices))):
            raise ValueError(f"{zip_path}: JPEG names are not test indices 0..N-1 without gaps")
        images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
        for i, (_, _, name) in enumerate(entries):
            with Image.open(io.BytesIO(archive.read(name))) as image:
                images[i] = np.asarray(image.convert("RGB"))
    labels = np.array([label for _, label, _ in entries], dtype=np.int64)
    return images, labels


def _save_npz_atomic(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write (images, labels) to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels)


def load_jpeg_test(
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All 10,000 test images from the JPEG (quality 75) copy: (images float NCHW, labels int64).

    Decoded with Pillow once (in test-index order, labels from the file names and checked
    against the official labels), then read from ``cache_dir`` (default ``~/.cache/edgequant``).
    The cache file is named after a hash of the zip, so a changed zip is decoded afresh.
    """
    zip_path = require_shared(JPEG_ZIP)
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cache_file = cache / f"cifar10_test_jpeg_q75_{digest}.npz"
    images: np.ndarray | None = None
    if cache_file.is_file():
        try:
            with np.load(cache_file) as data:
                images, labels = data["images"], data["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            images = None  # a damaged cache is rebuilt below
    if images is None:
        images, labels = _decode_jpeg_zip(zip_path)
        official = np.load(require_shared(TEST_LABELS)).astype(np.int64)
        if not np.array_equal(labels, official):
            mismatches = int((labels != official).sum()) if labels.shape == official.shape else -1
            raise ValueError(
                f"{zip_path}: labels in the file names disagree with {TEST_LABELS} "
                f"({mismatches} mismatches, -1: different counts)"
            )
        # An unwritable cache only costs the decoding time on the next call.
        with contextlib.suppress(OSError):
            _save_npz_atomic(cache_file, images, labels)
    return preprocess(images), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------- evaluation


def accuracy(
    model_or_fn: nn.Module | PredictFn,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy (0..1) of a module, or of a callable mapping float32 NCHW to logits.

    A module is run in eval mode under ``torch.inference_mode``; its training flags are
    restored afterwards. A callable gets numpy float32 batches and returns numpy logits (N, C).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    x = torch.as_tensor(images)
    y = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"images ({x.shape[0]}) and labels ({y.shape[0]}) differ in length")
    if x.shape[0] == 0:
        raise ValueError("images is empty")
    predictions = []
    if isinstance(model_or_fn, nn.Module):
        model = model_or_fn
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with in_eval_mode(model), torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                batch = x[start : start + batch_size].to(device, torch.float32)
                predictions.append(model(batch).argmax(dim=1).cpu())
    elif callable(model_or_fn):
        x_np = x.detach().cpu().numpy().astype(np.float32, copy=False)
        for start in range(0, x_np.shape[0], batch_size):
            logits = np.asarray(model_or_fn(x_np[start : start + batch_size]))
            predictions.append(torch.from_numpy(logits.argmax(axis=1)))
    else:
        raise TypeError(
            f"model_or_fn must be an nn.Module or a callable, got {type(model_or_fn).__name__}"
        )
    predicted = torch.cat(predictions).to(torch.int64)
    return float((predicted == y).to(torch.float64).mean())


def ort_predict_fn(
    onnx_path: str | os.PathLike[str], threads: int = 2, batch_size: int = 256
) -> PredictFn:
    """A callable running an ONNX model in ONNX Runtime (CPU): float32 NCHW -> logits.

    Inputs are run ``batch_size`` at a time; a model exported with a fixed batch size gets
    chunks of exactly that size (the last padded, the padding dropped from the output).
    """
    import onnxruntime as ort

    for name, value in (("threads", threads), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    chunk = fixed_batch or batch_size

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        outputs = []
        for start in range(0, x.shape[0], chunk):
            batch = x[start : start + chunk]
            n = batch.shape[0]
            if fixed_batch is not None and n < fixed_batch:
                pad = np.zeros((fixed_batch - n, *batch.shape[1:]), dtype=np.float32)
                batch = np.concatenate([batch, pad])
            outputs.append(session.run(None, {model_input.name: batch})[0][:n])
        return np.concatenate(outputs)

    return predict
