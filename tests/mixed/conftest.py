"""A trained MNIST-1D CNN and its calibration batches, shared by the mixed-precision tests."""

from __future__ import annotations

import pytest
import torch
from toys import nearest_recipe, relu_mlp  # tests/toys.py

import edgequant as eq
from edgequant.examples import mnist1d
from edgequant.mixed import MixedPlan, plan, sensitivity
from edgequant.mixed.sensitivity import Sensitivity, UniformModels, base_recipe, quantize_uniform
from edgequant.recipe import Recipe


@pytest.fixture(scope="session")
def cnn() -> torch.nn.Module:
    """The demo's CNN on MNIST-1D (trained once, cached); tests must not modify it."""
    return mnist1d.trained_cnn()


@pytest.fixture(scope="session")
def calib() -> list[torch.Tensor]:
    return mnist1d.calib_batches(256, batch_size=64)


@pytest.fixture(scope="session")
def val_acc():
    """eval_fn: accuracy (0..1) on the 500 validation signals (never the test split)."""
    batches = mnist1d.eval_batches("val")

    def accuracy(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        return right / sum(len(y) for _, y in batches)

    return accuracy


@pytest.fixture(scope="session")
def plan3(cnn, calib) -> MixedPlan:
    """A 3-bit average plan of the CNN (round-to-nearest base recipe), shared read-only."""
    return plan(
        cnn, calib, budget=eq.Budget.average_bits(3.0), recipe=nearest_recipe(64), num_samples=128
    )


@pytest.fixture(scope="session")
def gptq_recipe() -> Recipe:
    """The 8-bit base recipe on 64 calibration samples, which keep GPTQ (the pipeline's rounding
    at <= 4 bits) quick."""
    return base_recipe(None, 8).replace(calib_samples=64)


@pytest.fixture(scope="session")
def uniform(cnn, calib, gptq_recipe: Recipe) -> UniformModels:
    """The CNN quantized uniformly at 2, 3, 4 and 8 bits, shared read-only."""
    return quantize_uniform(cnn, calib, (2, 3, 4, 8), gptq_recipe)


@pytest.fixture(scope="session")
def pert(cnn, calib, uniform: UniformModels, gptq_recipe: Recipe) -> Sensitivity:
    """The perturbation sensitivity of the CNN's layers at those widths, shared read-only."""
    return sensitivity(cnn, calib, num_samples=128, quantized=uniform, recipe=gptq_recipe)


@pytest.fixture
def mlp() -> torch.nn.Module:
    """A small untrained MLP (8 -> 16 -> 4) for argument checks that fail before any work."""
    return relu_mlp(8, 16, 4)


@pytest.fixture
def batches() -> list[torch.Tensor]:
    return list(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)).split(16))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these convolutions are tiny, and on a shared 2-core machine two
    spinning threads cost more than they gain. Restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
