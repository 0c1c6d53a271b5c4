"""The example configs in examples/ load and validate, and their data factories work where the
data is installed (skipped with the reason elsewhere)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from edgequant.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_config_validates(name: str) -> None:
    config = load_config(EXAMPLES / name)
    assert config.task and config.calib_data is not None and config.eval_data is not None


def test_fashion_mnist_data() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        data = importlib.import_module("fashion_mnist_data")
        try:
            data.data_dir()
        except FileNotFoundError as err:
            pytest.skip(str(err))
        calib = data.calib_batches(128, 64)
        assert len(calib) == 2 and tuple(calib[0].shape) == (64, 1, 28, 28)
        (x, y), *_ = data.eval_batches()
        assert x.shape[0] == y.shape[0] == 500 and int(y.max()) <= 9
        held = data.heldout_batches()
        assert sum(int(b[1].shape[0]) for b in held) == 5000
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("fashion_mnist_data", None)
