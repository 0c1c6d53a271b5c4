"""eq.export_executorch: an ExecuTorch program (XNNPACK) on the simulation's grids, verified in
ExecuTorch's runtime before it is written."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from zoo import ZOO

import edgequant as eq
from edgequant.export.executorch import ExecuTorchRunner, delegated_ops


@pytest.fixture(scope="module")
def depthwise() -> tuple:
    model, calib = ZOO["depthwise_separable"]()
    recipe = eq.Recipe.preset("w8a8").for_target("executorch")
    return eq.quantize(model, recipe, calib, method="static"), calib


def test_executorch_target_grids() -> None:
    recipe = eq.Recipe.preset("w8a8").for_target("executorch")
    assert recipe.weight.signed and recipe.weight.symmetric and recipe.weight.narrow_range
    assert recipe.weight.granularity == "channel"
    assert recipe.activation.signed and not recipe.activation.symmetric
    assert recipe.activation.per_tensor


def test_depthwise_separable_runs_in_executorch_as_simulated(
    depthwise: tuple, tmp_path: Path
) -> None:
    qmodel, calib = depthwise
    path = tmp_path / "kws.pte"
    info = eq.export_executorch(qmodel, path, calib[0][:2], verify_data=calib)
    v = info.verification
    assert v.passed and v.sqnr_db is not None and v.sqnr_db > 60
    assert v.top1_agreement == 1.0
    assert v.samples == 2 + sum(len(b) for b in calib)
    pte = path.read_bytes()
    assert info.size_bytes == len(pte) and delegated_ops(pte) >= 1
    # A runner made from a temporary buffer keeps it: ExecuTorch reads the program from it.
    runner = ExecuTorchRunner(path.read_bytes())
    gc.collect()
    overwritten = [bytes([i]) * len(pte) for i in range(8)]  # reuse freed memory, if any
    x = calib[1][:5]
    with torch.no_grad():
        sim = qmodel(x)
    got = torch.from_numpy(runner.run([x.numpy()])[0])
    assert torch.equal(got.argmax(1), sim.argmax(1))
    assert (got - sim).abs().max() < 1e-4 * sim.abs().max()
    assert len(overwritten) == 8


def test_adaptive_avg_pool1d_keyword_spotter_runs_in_executorch(tmp_path: Path) -> None:
    model, calib = ZOO["ds_cnn_1d"]()
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target("mcu-int8"), calib)
    info = eq.export_executorch(qmodel, tmp_path / "kws1d.pte", calib[0][:1], verify_data=calib)
    v = info.verification
    assert v.passed and v.sqnr_db is not None and v.sqnr_db > 40 and v.top1_agreement == 1.0


def test_a_program_that_does_not_verify_is_not_written(depthwise: tuple, tmp_path: Path) -> None:
    qmodel, calib = depthwise
    path = tmp_path / "kws.pte"
    path.write_bytes(b"the user's file")
    with pytest.raises(eq.ExportError, match=r"SQNR .* dB < 1000.0 dB; nothing was written"):
        eq.export_executorch(qmodel, path, calib[0][:1], min_sqnr_db=1000.0)
    assert path.read_bytes() == b"the user's file"
    assert [p.name for p in tmp_path.iterdir()] == ["kws.pte"]


def test_grids_without_an_executorch_form_are_refused_naming_the_layer(tmp_path: Path) -> None:
    model, calib = ZOO["depthwise_separable"]()
    recipe = eq.Recipe.preset("w4a4").for_target("executorch")
    qmodel = eq.quantize(model, recipe, calib, method="static")
    with pytest.raises(eq.ExportError, match=r"16-level activations"):
        eq.export_executorch(qmodel, tmp_path / "m.pte", calib[0][:1])
    with pytest.raises(ValueError, match=r"must end in \.pte"):
        eq.export_executorch(qmodel, tmp_path / "m.tflite", calib[0][:1])
    assert not list(tmp_path.iterdir())
