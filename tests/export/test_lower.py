"""export/lower.py, the base of every exporter: a quantized model becomes modules that call the
export ops on stored integers, and still computes what the simulation computes."""

from __future__ import annotations

import pytest
import torch
from toys import quantize_case, relu_mlp, tensor_batches  # tests/toys.py

import edgequant as eq
from edgequant.export.lower import ExportError, LoweredLayer, LoweredQDQ, lower
from edgequant.quantizer import calibration_mode


def test_lowered_layers_store_integers_and_compute_the_simulation() -> None:
    calib = tensor_batches((8, 16), 4, 10)
    qmodel = eq.quantize(relu_mlp(16, 32, 4), "w8a8", calib)
    lowered = lower(qmodel)
    layers = {n: m for n, m in lowered.named_modules() if isinstance(m, LoweredLayer)}
    assert sorted(layers) == ["0", "2"]
    assert sum(isinstance(m, LoweredQDQ) for m in lowered.modules()) == 2
    # "exact" keeps weights that meet uint8 activations as uint8 + 128; "int8" keeps int8.
    assert {m.weight_q.dtype for m in layers.values()} == {torch.uint8}
    int8 = [m.weight_q.dtype for m in lower(qmodel, "int8").modules() if hasattr(m, "weight_q")]
    assert int8 == [torch.int8] * 2
    with torch.no_grad():
        for x in calib:
            # Equal up to float32 rounding: the same arithmetic on the same integers.
            assert torch.allclose(lowered(x), qmodel(x), rtol=0, atol=1e-6)
    assert not any(isinstance(m, LoweredLayer) for m in qmodel.modules())  # a copy


def test_a_graph_quantizer_still_observing_is_named() -> None:
    model, calib, _ = quantize_case("residual")
    qmodel = eq.quantize(model, "w8a8", calib)
    with (
        calibration_mode(qmodel),
        pytest.raises(
            ExportError, match=r"quantizer '\S+\.output' is in mode 'observe'; calibrate"
        ),
    ):
        lower(qmodel)
    assert isinstance(lower(qmodel), torch.fx.GraphModule)
