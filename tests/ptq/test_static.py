"""The static PTQ pipeline (ptq/static.py) as the recipe switches its steps: what it records,
each step switched off, and learned rounding that improves the model and exports. Each step's
own algorithm is tested beside its module (test_gptq, test_adaround, test_equalize,
test_bias_correction, test_smoothquant)."""

from __future__ import annotations

import functools

import pytest
import torch
from toys import Chain, chain_batches, quantize_chain  # tests/toys.py

import edgequant as eq
from edgequant.modules import QuantMixin
from edgequant.ptq import adaround
from edgequant.ptq import static as R


def test_default_w4_pipeline_runs_and_is_recorded() -> None:
    model = Chain().eval()
    q = quantize_chain(model, "w4a8")
    pipeline = q.quant_info["pipeline"]
    assert pipeline["rounding"] == "gptq" and pipeline["bias_correction"] is True
    assert "gptq weight rounding" in pipeline["steps"]
    # At 8 bits the default is plain rounding.
    q8 = quantize_chain(model, "w8a8")
    assert q8.quant_info["pipeline"]["rounding"] == "nearest"
    assert q8.quant_info["pipeline"]["bias_correction"] is False


def test_every_step_can_be_switched_off() -> None:
    model = Chain().eval()
    q = quantize_chain(
        model,
        "w4a8",
        rounding="nearest",
        bias_correction=False,
        equalize=False,
        reduce_range=False,
    )
    p = q.quant_info["pipeline"]
    assert p["steps"] == ["weight and activation ranges calibrated"]
    # Weights are then exactly round-to-nearest of the folded float weights.
    layer = q.get_submodule("conv2")
    assert isinstance(layer, QuantMixin)


@pytest.mark.parametrize("rounding", ["gptq", "adaround"])
def test_learned_rounding_improves_the_model_and_exports(
    rounding: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fewer AdaRound iterations keep the test fast; the method is the same.
    monkeypatch.setitem(
        R.ROUNDERS, "adaround", functools.partial(adaround.round_adaround, iters=150)
    )
    model = Chain().eval()
    x = torch.cat(chain_batches(seed=7))
    with torch.no_grad():
        ref = model(x)
    near = quantize_chain(model, "w3a8", rounding="nearest", bias_correction=False)
    learned = quantize_chain(model, "w3a8", rounding=rounding, bias_correction=False)
    with torch.no_grad():
        err_near = float((near(x) - ref).square().mean())
        err_learned = float((learned(x) - ref).square().mean())
    assert err_learned < err_near
    info = eq.export_onnx(learned, tmp_path / "m.onnx", chain_batches()[0])
    assert info.verification.passed and info.integer_weights >= info.quantized_layers
