"""A mixed-precision model (2, 3, 4 and 8-bit weights) exported to ONNX: 8-bit and INT4 initializers
(2- and 3-bit weights in INT4 containers), verified in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import edgequant as eq
from edgequant.mixed.sensitivity import base_recipe
from edgequant.modules import QuantMixin

RECIPE = base_recipe(None, 8).replace(calib_samples=64)  # the default pipeline (GPTQ at <= 4 bits)


def test_mixed_model_exports_int8_and_int4_and_verifies(cnn, calib, tmp_path: Path) -> None:
    """2, 3, 4 and 8 bits in one model: ONNX Runtime computes what the simulation does; 2/3/4-bit
    weights are INT4 initializers holding only their grid's integers, the 8-bit one UINT8 (zero
    point 128)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgequant.export.inspect import inspect_onnx
    from edgequant.mixed.plan import recipe_for

    bits = {"conv1": 8, "conv2": 2, "conv3": 3, "linear": 4}
    params = {"conv1": 160, "conv2": 5120, "conv3": 5120, "linear": 320}
    recipe = eq.Recipe.from_yaml(recipe_for(RECIPE, bits, params).to_yaml())
    qmodel = eq.quantize(cnn, recipe, calib)
    assert {
        n: m.weight_quantizer.spec.bits
        for n, m in qmodel.named_modules()
        if isinstance(m, QuantMixin) and m.weight_quantizer is not None
    } == bits
    path = tmp_path / "mixed.onnx"
    info = eq.export_onnx(qmodel, path, calib[0][:4], verify_data=calib[:2], weight_storage="exact")
    assert info.verification.passed
    report = inspect_onnx(path)
    dtypes = {layer.weight_dtype for layer in report.layers if layer.quantized}
    assert dtypes == {"UINT8", "INT4"}  # 8-bit weights as uint8 + 128: export.int8_kernels.as_uint8
    stored = onnx.load(str(path))
    int4 = [i for i in stored.graph.initializer if i.data_type == 22 and len(i.dims) >= 2]
    ranges = sorted(
        (int(numpy_helper.to_array(i).astype(np.int8).min()),
         int(numpy_helper.to_array(i).astype(np.int8).max()))
        for i in int4
    )  # fmt: skip
    # 2-bit grid -2..1, 3-bit -4..3, 4-bit -8..7: each container holds its own grid only.
    assert len(ranges) == 3
    assert ranges[0][0] >= -8 and ranges[-1][1] <= 7
    assert min(hi for _, hi in ranges) <= 1 and max(lo for lo, _ in ranges) >= -2
