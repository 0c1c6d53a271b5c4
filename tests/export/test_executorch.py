"""eq.export_executorch: an ExecuTorch program (XNNPACK) on the simulation's grids, verified in
ExecuTorch's runtime before it is written."""

from __future__ import annotations

import gc
import importlib
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


def _conv_conv(target: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    class ConvConv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    recipe = eq.Recipe.preset("w8a8").for_target(target)
    return eq.quantize(ConvConv().eval(), recipe, calib), calib


def test_a_model_ending_in_a_conv_runs_as_simulated(tmp_path: Path) -> None:
    """The executorch target keeps the last conv's output float: that conv runs as a float conv
    on its dequantized weight (ExecuTorch's portable kernels computed it wrongly, 2.4 dB), the
    first stays an int8 conv."""
    from edgequant.export.pt2e import export_program, pt2e_model

    qmodel, calib = _conv_conv("executorch")
    info = eq.export_executorch(qmodel, tmp_path / "cc.pte", calib[0][:1], verify_data=calib)
    assert info.verification.sqnr_db is not None and info.verification.sqnr_db > 60
    program = export_program(pt2e_model(qmodel, True), (calib[0][:1],), True, concat_grid=True)
    weights = [n.args[1] for n in program.graph.nodes if "conv2d" in str(n.target)]
    kinds = [str(w.target) if w.op == "call_function" else w.op for w in weights]
    assert kinds == ["quantized_decomposed.dequantize_per_channel.default", "placeholder"]


def test_upsampling_and_skips_lower_as_one_program() -> None:
    """A U-Net block (nearest upsampling, a concatenation skip): the upsampling is an exact
    transposed convolution, every dequantize node has one reader (a shared one made XNNPACK's
    partitions depend on each other; tests/test_zoo_edge.py runs both programs)."""
    from edgequant.export.pt2e import export_program, pt2e_model

    model, calib = ZOO["concat_upsample"]()
    for target in ("mcu-int8", "executorch"):
        qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target(target), calib)
        program = export_program(pt2e_model(qmodel, True), (calib[0][:1],), True, concat_grid=True)
        ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert "aten.conv_transpose2d.input" in ops and "aten.upsample_nearest2d.vec" not in ops
        dequantized = [n for n in program.graph.nodes if "dequantize_per_tensor" in str(n.target)]
        assert all(len(n.users) == 1 for n in dequantized)
        with torch.no_grad():
            got, sim = program.module()(calib[1][:1]), qmodel(calib[1][:1])
        assert (got - sim).abs().max() <= 1e-5 * sim.abs().max()  # float conv rounding


def test_adaptive_max_pool_of_uneven_windows_is_refused_before_lowering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgequant.export.executorch as executorch

    class Uneven(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(2, 8, 3, padding=1)
            self.pool = torch.nn.AdaptiveMaxPool1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(torch.relu(self.conv(x))).flatten(1)

    torch.manual_seed(0)
    calib = [torch.randn(4, 2, 16) for _ in range(2)]
    recipe = eq.Recipe.preset("w8a8").for_target("executorch")
    # eq.quantize refuses it first (tests/check/test_check.py); the exporter refuses it too for
    # a model that reached it otherwise.
    with pytest.raises(ValueError, match=r"'adaptive_max_pool1d \(uneven windows\)' at 'pool'"):
        eq.quantize(Uneven().eval(), recipe, calib)
    quantize_module = importlib.import_module("edgequant.ptq.quantize")  # not the function
    monkeypatch.setattr(quantize_module, "require_target_fits", lambda *_: None)
    qmodel = eq.quantize(Uneven().eval(), recipe, calib)
    monkeypatch.setattr(executorch, "lower_to_executorch", lambda *_: pytest.fail("lowered"))
    with pytest.raises(eq.ExportError, match=r"aten\.adaptive_max_pool1d \(layer 'pool'\)"):
        eq.export_executorch(qmodel, tmp_path / "u.pte", calib[0][:1])
    assert not list(tmp_path.iterdir())
