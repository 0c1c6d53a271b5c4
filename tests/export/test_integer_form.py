"""The integer form: eval-mode static layers sum integers exactly, so ONNX Runtime computes the
same bits, including for layers it has no integer kernel for (4-bit weights or activations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from toys import small_resnet_case  # tests/toys.py

import edgequant as eq
from edgequant.functional import sqnr_db


def _model_and_data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    return small_resnet_case(128)


@pytest.mark.parametrize("preset", ["w4a8", "w4a4", "w8a8"])
def test_deployed_model_matches_the_simulation(tmp_path: Path, preset: str) -> None:
    model, calib, test = _model_and_data()
    # first_last_bits=None: every layer at the preset's bits, so the 4-bit paths are exercised.
    recipe = eq.Recipe.preset(preset).replace(first_last_bits=None)
    qmodel = eq.quantize(model, recipe, calib)
    path = tmp_path / f"{preset}.onnx"
    info = eq.export_onnx(qmodel, path, test[:4])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    deployed = torch.from_numpy(
        np.asarray(sess.run(None, {sess.get_inputs()[0].name: test.numpy()})[0])
    )
    with torch.no_grad():
        simulated = qmodel(test)
    assert info.verification.passed
    assert (deployed.argmax(1) == simulated.argmax(1)).all()
    # ONNX Runtime has no integer kernel for 4-bit layers: they run as float ops on
    # integer-valued tensors, exact. 8-bit layers run in QLinearConv / QLinearAdd, whose
    # roundings the simulation makes too (ort_kernels). The bits agree up to the last float ulp
    # of the head.
    assert sqnr_db(simulated, deployed) > 100.0


def test_integer_form_equals_fake_quantized_form_up_to_rounding() -> None:
    model, calib, test = _model_and_data()
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8"), calib)
    with torch.no_grad():
        integer = qmodel.eval()(test)
        fake = qmodel.train()(test)  # training mode runs the fake-quantized float form
    qmodel.eval()
    assert sqnr_db(fake, integer) > 30.0
    assert (fake.argmax(1) == integer.argmax(1)).float().mean() > 0.95
