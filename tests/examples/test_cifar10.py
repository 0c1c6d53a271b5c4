"""CIFAR-10 data, the ResNet-20 architecture and its pretrained checkpoint."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edgequant.examples import cifar10
from edgequant.examples.shared import ENV_VAR, require_shared, shared_dir

# README of models/: 91.63 % on test_932 (854 of 932 images).
FP32_TEST_932 = 0.9163


# ------------------------------------------------------------------------- architecture (no data)


def test_resnet20_has_the_papers_parameter_count():
    model = cifar10.resnet20()
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_parameter_names_match_the_original():
    names = {name.rsplit(".", 1)[0] for name, _ in cifar10.resnet20().named_parameters()}
    expected = {"conv1", "bn1", "linear"} | {
        f"layer{stage}.{block}.{layer}"
        for stage in (1, 2, 3)
        for block in (0, 1, 2)
        for layer in ("conv1", "bn1", "conv2", "bn2")
    }
    assert names == expected


@pytest.mark.parametrize("size", [7, 8, 31, 33])
def test_shortcut_subsamples_and_zero_pads_odd_sizes(size):
    shortcut = cifar10.PadShortcut(pad=8)
    x = torch.randn(2, 16, size, size)
    out = shortcut(x)
    half = (size + 1) // 2
    assert out.shape == (2, 32, half, half)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0
    assert torch.count_nonzero(out[:, 24:]) == 0


@pytest.mark.parametrize("size", [31, 33])
def test_resnet20_runs_on_odd_input_sizes(size):
    # The stride-2 convolution keeps ceil(H/2) rows, like the shortcut's strided slice.
    assert cifar10.resnet20().eval()(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_resnet20_deep_copies_and_pickles():
    model = cifar10.resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x))


# ---------------------------------------------------------------------------- preprocessing


def test_preprocess_shapes_dtype_and_channel_order():
    images = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = 255  # pure red
    x = cifar10.preprocess(images)
    assert x.shape == (5, 3, 32, 32)
    assert x.dtype == torch.float32
    assert x.is_contiguous()
    expected = [(1 - cifar10.MEAN[0]) / cifar10.STD[0]] + [
        -cifar10.MEAN[c] / cifar10.STD[c] for c in (1, 2)
    ]
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(expected), rtol=0, atol=1e-6)
    assert torch.equal(cifar10.preprocess(torch.from_numpy(images)), x)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((5, 32, 32, 3), dtype=np.float32),
        np.zeros((5, 3, 32, 32), dtype=np.uint8),
        np.zeros((32, 32, 3), dtype=np.uint8),
    ],
)
def test_preprocess_rejects_wrong_dtype_or_layout(bad):
    with pytest.raises(ValueError, match="uint8 of shape"):
        cifar10.preprocess(bad)


# ------------------------------------------------------------------------ missing shared folder


def test_missing_shared_folder_is_reported_with_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    assert shared_dir() is None
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        require_shared("models/cifar10_resnet20/resnet20-12fca82f.th")
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        cifar10.load_resnet20()


def test_missing_file_in_shared_folder_names_the_path(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert shared_dir() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="test_932.npz"):
        cifar10.load_split("test_932")


def test_explicit_checkpoint_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.th"):
        cifar10.load_resnet20(tmp_path / "missing.th")


def test_tests_skip_cleanly_without_the_shared_folder(tmp_path):
    repo_root = Path(__file__).resolve().parents[2]
    python_path = os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, ENV_VAR: str(tmp_path / "nowhere"), "PYTHONPATH": python_path}
    # Only tests that need the folder: each must be skipped, none may fail or error.
    selected = "checkpoint_loads_strictly or fp32_accuracy or jpeg_test_set or disjoint_calibration"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-rs", "-p", "no:cacheprovider"]
        + ["-k", selected],
        env=env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 skipped" in result.stdout, result.stdout
    assert "../shared is absent" in result.stdout
    assert "passed" not in result.stdout and "error" not in result.stdout.lower()


# -------------------------------------------------------------------------- with the shared data


def test_checkpoint_loads_strictly(shared):
    checkpoint = torch.load(shared / cifar10.WEIGHTS, map_location="cpu", weights_only=True)
    stored = {k.removeprefix("module.") for k in checkpoint["state_dict"]}
    model = cifar10.resnet20()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert stored == expected
    model.load_state_dict(
        {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}, strict=True
    )


def test_pretrained_model_is_in_eval_mode(resnet20):
    assert not any(m.training for m in resnet20.modules())


def test_fp32_accuracy_on_test_932(resnet20, cifar_test_932):
    images, labels = cifar_test_932
    assert cifar10.accuracy(resnet20, images, labels) == pytest.approx(FP32_TEST_932, abs=5e-4)


def test_accuracy_restores_training_flags_and_accepts_callables(resnet20, cifar_test_932):
    images, labels = cifar_test_932
    images, labels = images[:200], labels[:200]
    resnet20.train()
    resnet20.layer2.eval()
    before = {name: m.training for name, m in resnet20.named_modules()}
    from_module = cifar10.accuracy(resnet20, images, labels, batch_size=64)
    assert {name: m.training for name, m in resnet20.named_modules()} == before
    resnet20.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.shape[0] <= 64
        with torch.no_grad():
            return resnet20(torch.from_numpy(x)).numpy()

    assert cifar10.accuracy(predict, images.numpy(), labels.numpy(), batch_size=64) == from_module


def test_splits_shapes_and_disjoint_calibration(shared):
    images, labels = cifar10.load_split("train_4660")
    assert images.shape == (4660, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (4660,) and labels.dtype == torch.int64
    assert set(labels.tolist()) == set(range(10))

    calib, calib_labels = cifar10.calibration_split(n=512, seed=0)
    assert calib.shape == (512, 3, 32, 32) and calib_labels.shape == (512,)
    smaller, _ = cifar10.calibration_split(n=128, seed=0)
    assert torch.equal(smaller, calib[:128])
    assert torch.equal(cifar10.calibration_split(n=512, seed=0)[0], calib)
    assert not torch.equal(cifar10.calibration_split(n=512, seed=1)[0], calib)

    heldout, heldout_labels = cifar10.heldout_split()
    assert heldout.shape == (660, 3, 32, 32)
    assert torch.equal(heldout, images[4000:]) and torch.equal(heldout_labels, labels[4000:])
    jpeg, jpeg_labels = cifar10.heldout_jpeg_split()
    assert jpeg.shape == (1320, 3, 32, 32) and torch.equal(jpeg_labels[660:], heldout_labels)
    assert torch.equal(jpeg[660:], jpeg[:660].flip(-1))
    noise = (jpeg[:660] - heldout).abs().mean()
    assert 0 < noise < 0.5, noise  # compressed, not some other image
    with pytest.raises(ValueError, match="quality"):
        cifar10.heldout_jpeg_split(quality=0)
    train, train_labels = cifar10.train_split()
    assert torch.equal(train, images[:4000])
    train_jpeg, train_jpeg_labels = cifar10.train_jpeg_split()
    assert train_jpeg.shape == train.shape and torch.equal(train_jpeg_labels, train_labels)
    noise = (train_jpeg - train).abs().mean()
    assert 0 < noise < 0.5, noise  # each image compressed in place, same order
    with pytest.raises(ValueError, match="quality"):
        cifar10.train_jpeg_split(quality=96)
    # The judge beside a calibration set: everything train_4660 holds except those images.
    judge, judge_labels = cifar10.uncalibrated_jpeg_split(3000, seed=0)
    assert judge.shape == (2 * 1660, 3, 32, 32) and judge_labels.shape == (3320,)
    assert torch.equal(judge[1660:], judge[:1660].flip(-1))
    assert torch.equal(judge[1000:1660], jpeg[:660])  # the held-out part, last
    used = cifar10.calibration_split(n=3000, seed=0)[0]
    used_set = {bytes(row.numpy().tobytes()) for row in used.flatten(1)}
    kept = {bytes(row.numpy().tobytes()) for row in train.flatten(1)} - used_set
    assert len(kept) == 1000
    # The judge's first 1000 are JPEG copies of exactly the images calibration left out.
    nearest = torch.cdist(judge[:1000].flatten(1), train.flatten(1)).argmin(1)
    assert {bytes(train[i].numpy().tobytes()) for i in nearest.tolist()} == kept
    for bad in (0, 4000, 2.5):
        with pytest.raises(ValueError, match="n must be"):
            cifar10.uncalibrated_jpeg_split(bad)
    # Every calibration image comes from the first 4000 and none from the held-out part.
    everything = cifar10.calibration_split(n=4000, seed=0)[0]
    flat = {bytes(row.numpy().tobytes()) for row in everything.flatten(1)}
    assert flat == {bytes(row.numpy().tobytes()) for row in train.flatten(1)}

    with pytest.raises(ValueError, match="4000"):
        cifar10.calibration_split(n=4001)
    with pytest.raises(ValueError, match="test_932"):
        cifar10.load_split("test_10000")


@pytest.mark.slow  # minutes on 2 cores: run with the benchmarks (pytest -m slow)
def test_onnx_runtime_predictions_match_pytorch(resnet20, cifar_test_932, tmp_path):
    # A fixed batch of 100 exercises the padding of the last chunk (932 = 9 x 100 + 32).
    path = tmp_path / "resnet20.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            resnet20, (torch.zeros(100, 3, 32, 32),), str(path), dynamo=False, opset_version=17
        )
    predict = cifar10.ort_predict_fn(path, threads=2)
    images, labels = cifar_test_932
    logits = predict(images.numpy())
    with torch.no_grad():
        expected = resnet20(images).numpy()
    assert logits.shape == (932, 10)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    assert cifar10.accuracy(predict, images, labels) == cifar10.accuracy(resnet20, images, labels)


def test_ort_predict_fn_requires_an_existing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        cifar10.ort_predict_fn(tmp_path / "absent.onnx")


def test_jpeg_test_set_is_cached(shared, tmp_path):
    images, labels = cifar10.load_jpeg_test(cache_dir=tmp_path)
    assert images.shape == (10_000, 3, 32, 32) and labels.shape == (10_000,)
    official = np.load(shared / cifar10.TEST_LABELS)
    assert np.array_equal(labels.numpy(), official)
    (cache_file,) = tmp_path.glob("*.npz")
    again, again_labels = cifar10.load_jpeg_test(cache_dir=tmp_path)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    assert list(tmp_path.iterdir()) == [cache_file]  # no temporary files left behind
    # JPEG q75 is close to, but not, the exact pixels of the same test images.
    exact, exact_labels = cifar10.load_split("test_932")
    assert torch.equal(labels[:932], exact_labels)
    mean_abs = (images[:932] - exact).abs().mean().item()
    assert 0.01 < mean_abs < 0.3
