"""MNIST-1D: data generated locally, the 1-D CNN, training and the config factories."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from toys import same_state_dict  # tests/toys.py

from edgequant.examples import mnist1d


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return mnist1d.load_mnist1d()


# ---------------------------------------------------------------------------------------- data


def test_splits_shapes_and_dtypes(data: dict[str, torch.Tensor]) -> None:
    sizes = {"train": 3500, "val": 500, "test": 1000}
    for split, n in sizes.items():
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        assert x.shape == (n, 1, 40) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(10))
    # make_dataset standardises the whole set: mean 0 and std 1 over train + test.
    everything = torch.cat([data["x_train"], data["x_val"], data["x_test"]])
    assert abs(float(everything.mean())) < 1e-4 and abs(float(everything.std()) - 1) < 1e-3


def test_val_is_the_last_500_of_the_package_train_set(data: dict[str, torch.Tensor]) -> None:
    import mnist1d.data

    raw = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    x = torch.from_numpy(raw["x"].astype(np.float32)).unsqueeze(1)
    assert torch.equal(data["x_train"], x[:3500]) and torch.equal(data["x_val"], x[3500:])
    assert torch.equal(data["y_val"], torch.from_numpy(raw["y"][3500:]))
    assert torch.equal(
        data["x_test"], torch.from_numpy(raw["x_test"].astype(np.float32)).unsqueeze(1)
    )


def test_deterministic_and_fresh_tensors(data: dict[str, torch.Tensor]) -> None:
    again = mnist1d.load_mnist1d()
    assert all(torch.equal(data[k], again[k]) for k in data)
    again["x_train"].zero_()  # the caller owns what it gets; the next call is unaffected
    assert torch.equal(mnist1d.load_mnist1d()["x_train"], data["x_train"])


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty user cache folder (HOME points at tmp_path) and an empty in-process cache."""
    monkeypatch.setenv("HOME", str(tmp_path))
    mnist1d._generate.cache_clear()
    yield tmp_path / ".cache" / "edgequant"
    mnist1d._generate.cache_clear()


def test_generated_offline_without_touching_global_random_state(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: Path
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("MNIST-1D tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    other = mnist1d.load_mnist1d(seed=7)  # not cached yet: generated here, under the patch
    assert (random.random(), np.random.rand()) == expected
    assert other["x_train"].shape == (3500, 1, 40)
    assert not torch.equal(other["x_train"], mnist1d.load_mnist1d()["x_train"])


def test_generated_data_is_cached_on_disk_and_regenerated_when_damaged(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: Path
) -> None:
    import mnist1d.data as generator

    first = mnist1d.load_mnist1d(seed=7)
    files = list(fresh_cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("mnist1d_data_")
    assert files[0].suffix == ".npz"

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated again despite the cache")

    mnist1d._generate.cache_clear()
    monkeypatch.setattr(generator, "make_dataset", no_generation)
    cached = mnist1d.load_mnist1d(seed=7)
    assert all(torch.equal(first[k], cached[k]) for k in first)
    assert not mnist1d._generate(7)[0].flags.writeable
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(fresh_cache.parent.parent))
    for damage in (b"damaged", files[0].read_bytes()[:2000]):  # garbage; a truncated file
        files[0].write_bytes(damage)
        mnist1d._generate.cache_clear()
        rebuilt = mnist1d.load_mnist1d(seed=7)
        assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    assert [p.name for p in fresh_cache.iterdir()] == [files[0].name]  # no temp files left


def test_load_rejects_a_non_int_seed() -> None:
    with pytest.raises(TypeError, match="seed"):
        mnist1d.load_mnist1d(seed="0")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- model


def test_cnn1d_shape_size_and_seeded_init() -> None:
    state = torch.random.get_rng_state()
    model = mnist1d.cnn1d()
    assert torch.equal(torch.random.get_rng_state(), state)  # global generator untouched
    assert sum(p.numel() for p in model.parameters()) == 10_922
    assert model(torch.randn(3, 1, 40)).shape == (3, 10)
    same, other = mnist1d.cnn1d(seed=0), mnist1d.cnn1d(seed=1)
    assert torch.equal(model.conv2.weight, same.conv2.weight)
    assert not torch.equal(model.conv2.weight, other.conv2.weight)


def test_two_epochs_beat_chance_deterministically(data: dict[str, torch.Tensor]) -> None:
    model = mnist1d.cnn1d()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    untrained = mnist1d.accuracy(model, data["x_val"], data["y_val"])
    trained = mnist1d.train(model, data, epochs=2, seed=0, threads=1)
    again = mnist1d.train(model, data, epochs=2, seed=0, threads=1)
    val = mnist1d.accuracy(trained, data["x_val"], data["y_val"])
    assert untrained < 0.2 and val > 0.6, (untrained, val)
    assert not trained.training
    assert same_state_dict(trained, again)
    # The argument is not trained in place.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_rejects_bad_arguments(data: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="epochs"):
        mnist1d.train(mnist1d.cnn1d(), data, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        mnist1d.train(mnist1d.cnn1d(), data, lr=-1.0)
    with pytest.raises(ValueError, match="x_train"):
        mnist1d.train(mnist1d.cnn1d(), {"x_val": data["x_val"]})


def test_accuracy_of_a_module_and_of_a_numpy_callable(data: dict[str, torch.Tensor]) -> None:
    x, y = data["x_test"][:100], data["y_test"][:100]
    onehot = torch.nn.functional.one_hot(y, 10).float().numpy()
    lookup = {x[i].numpy().tobytes(): onehot[i] for i in range(100)}

    def oracle(batch: np.ndarray) -> np.ndarray:
        return np.stack([lookup[row.tobytes()] for row in batch])

    assert mnist1d.accuracy(oracle, x, y, batch_size=32) == 1.0
    model = mnist1d.cnn1d().train()
    assert 0.0 <= mnist1d.accuracy(model, x, y) <= 1.0 and model.training  # flags restored


# ----------------------------------------------------------------------------------- factories


def test_trained_cnn_is_cached_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = mnist1d.trained_cnn(epochs=1, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("mnist1d_cnn_") and files[0].suffix == ".pt"

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(mnist1d, "train", no_training)
    cached = mnist1d.trained_cnn(epochs=1, cache_dir=tmp_path)
    assert not cached.training
    assert same_state_dict(first, cached)
    monkeypatch.undo()
    files[0].write_bytes(b"damaged")  # a damaged cache file is retrained and replaced
    rebuilt = mnist1d.trained_cnn(epochs=1, cache_dir=tmp_path)
    assert same_state_dict(first, rebuilt)
    assert [p.name for p in tmp_path.iterdir()] == [files[0].name]  # no temp files left


def test_qat_holdout_leaves_qats_held_out_batches_out_of_fp32_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit, held = mnist1d.qat_split()
    assert [len(y) for _, y in held] == [100] * 5 and sum(len(y) for _, y in fit) == 3000
    seen: list[torch.Tensor] = []

    def spy(model: torch.nn.Module, data: dict[str, torch.Tensor], **kwargs: object) -> object:
        seen.append(data["x_train"])
        return model.eval()

    monkeypatch.setattr(mnist1d, "train", spy)
    mnist1d.trained_cnn(epochs=1, cache_dir=tmp_path, qat_holdout=True)
    mnist1d.trained_cnn(epochs=1, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # cached apart
    without, everything = ({r.numpy().tobytes() for r in x} for x in seen)
    held_rows = {r.numpy().tobytes() for x, _ in held for r in x}
    assert len(everything) == 3500 and held_rows <= everything
    assert len(without) == 3000 and not (held_rows & without)


def test_calib_and_eval_batches(data: dict[str, torch.Tensor]) -> None:
    calib = mnist1d.calib_batches(n=300, batch_size=64, seed=0)
    assert [b.shape[0] for b in calib] == [64, 64, 64, 64, 44]
    rows = {r.numpy().tobytes() for r in torch.cat(calib)}
    assert len(rows) == 300
    assert rows <= {r.numpy().tobytes() for r in data["x_train"]}  # never val or test
    assert torch.equal(torch.cat(mnist1d.calib_batches(n=100))[:64], calib[0])  # nested by seed
    test = mnist1d.eval_batches()
    assert sum(len(y) for _, y in test) == 1000
    assert torch.equal(torch.cat([x for x, _ in mnist1d.eval_batches("val")]), data["x_val"])
    with pytest.raises(ValueError, match="split"):
        mnist1d.eval_batches("train")
    with pytest.raises(ValueError, match="n must be"):
        mnist1d.calib_batches(n=0)
    train = mnist1d.train_batches(batch_size=500)
    assert len(train) == 7 and sum(len(y) for _, y in train) == 3500
