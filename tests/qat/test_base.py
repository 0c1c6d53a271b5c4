"""What every QAT quantizer shares (qat/base.py): power-of-two grids from the first training step
under the dsp-pow2 target, exported unchanged."""

from __future__ import annotations

import math

import numpy as np
import torch

import edgequant as eq
from edgequant.qat import prepare_qat
from edgequant.qat.lsq import LSQQuantizer
from edgequant.quantizer import quantizers


def test_pow2_scales_from_the_first_step_and_export_unchanged(
    tiny_model, calib, train_data, tmp_path, sgd_steps
):
    """Issue 6: QAT under the dsp-pow2 target trains on power-of-two grids and exports them,
    through ResNet-20's option-A join (strided slice, zero padding, add) on signed INT8 grids."""
    recipe = eq.Recipe.preset("w8a8").for_target("dsp-pow2")
    assert tiny_model.slice_join
    qat = prepare_qat(tiny_model, recipe, calib, start="calibrated")

    def grids_are_powers_of_two() -> None:
        for q in quantizers(qat):  # the grid every training step used
            assert torch.equal(torch.exp2(torch.round(torch.log2(q.scale))), q.scale), q.name

    sgd_steps(qat, train_data, after_step=grids_are_powers_of_two)
    moved = [
        q
        for q in quantizers(qat)
        if isinstance(q, LSQQuantizer) and not torch.equal(q.learned_scale.detach(), q.scale)
    ]
    assert moved  # the learned (float) step sizes trained; their grids stayed powers of two
    qat.eval()
    for q in quantizers(qat):
        assert torch.equal(torch.exp2(torch.round(torch.log2(q.scale))), q.scale), q.name
    info = eq.export_onnx(qat, tmp_path / "pow2.onnx", calib[0][:2], verify_data=calib)
    assert info.verification.passed
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(tmp_path / "pow2.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    scale_names = {
        n.input[1] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    }
    scales = [v for name in scale_names if name in inits for v in inits[name].reshape(-1).tolist()]
    assert len(scales) >= 5
    assert all(math.log2(v) == round(math.log2(v)) for v in scales)
    # The join stays on the signed grid: the slices and the pad each feed a QuantizeLinear with
    # an INT8 zero point (ONNX Runtime runs them on integers and propagates nothing itself).
    readers = {i: n for n in graph.node for i in n.input}
    moves = [n for n in graph.node if n.op_type in ("Slice", "Pad")]
    assert {n.op_type for n in moves} == {"Slice", "Pad"}
    for node in moves:
        reader = readers[node.output[0]]
        assert reader.op_type == "QuantizeLinear", node.name
        assert inits[reader.input[2]].dtype == np.int8, node.name
