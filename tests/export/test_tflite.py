"""eq.export_tflite: fully integer .tflite files that TFLite Micro and LiteRT's reference kernels
run bit for bit like the integer reference, with the simulation's grids carried exactly."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO  # noqa: E402

import edgequant as eq
from edgequant.export.lower import LoweredQDQ
from edgequant.export.pt2e import Pt2eQDQ, export_program, unsupported_nodes
from edgequant.export.tflite import TFLITE_OPS
from edgequant.export.tflite_runtime import TFLiteRunner, litert_interpreter
from edgequant.quantizer import TensorQuantizer
from edgequant.spec import QuantSpec


def _mcu(name: str) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    model, calib = ZOO[name]()
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    return model, eq.quantize(model, recipe, calib, method="static"), calib


@pytest.fixture(scope="module")
def depthwise(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    _, qmodel, calib = _mcu("depthwise_separable")
    path = tmp_path_factory.mktemp("ds") / "kws.tflite"
    info = eq.export_tflite(qmodel, path, calib[0][:2], verify_data=calib)
    return qmodel, calib, path, info


def test_depthwise_separable_runs_bit_exact_in_tflite_micro(depthwise: tuple) -> None:
    qmodel, calib, path, info = depthwise
    v = info.verification
    assert v.passed and v.bit_exact == 1.0 and v.max_step_difference == 0
    assert v.samples == 2 + sum(len(b) for b in calib)
    assert v.top1_agreement == 1.0
    assert "DEPTHWISE_CONV_2D" in info.ops and "FULLY_CONNECTED" in info.ops
    assert info.size_bytes == path.stat().st_size
    assert info.arena_bytes is not None and info.arena_bytes > 0
    # The written file, run afresh in TFLite Micro in that arena, gives the simulation's classes.
    runner = TFLiteRunner(path.read_bytes(), "tflite-micro", info.arena_bytes)
    x = calib[1][:6]
    with torch.no_grad():
        sim = qmodel(x).numpy()
    got = runner.run([x.numpy()])[0]
    assert np.array_equal(got.argmax(1), sim.argmax(1))


def test_file_carries_the_simulation_grids(depthwise: tuple) -> None:
    """int8 input and output with the quantizers' own scale and zero point; int8 weights equal
    to torch.quantize_per_channel's on the layer's scales."""
    qmodel, _, path, info = depthwise
    it = litert_interpreter(path.read_bytes())
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    iq = qmodel.stem.input_quantizer
    assert np.float32(inp["quantization"][0]) == np.float32(iq.scale.item())
    assert inp["quantization"][1] == int(iq.zero_point.item())
    assert info.input_quantization == [inp["quantization"]]
    fc = qmodel.fc
    wq = fc.weight_quantizer
    expected = torch.quantize_per_channel(
        fc.weight.detach(), wq.scale.double(), wq.zero_point.long(), 0, torch.qint8
    ).int_repr()
    weights = [
        d
        for d in it.get_tensor_details()
        if d["dtype"] == np.int8 and tuple(d["shape"]) == tuple(fc.weight.shape)
    ]
    assert len(weights) == 1
    assert np.array_equal(it.get_tensor(weights[0]["index"]), expected.numpy())
    scales = weights[0]["quantization_parameters"]["scales"]
    assert np.array_equal(scales, wq.scale.float().numpy())


@pytest.mark.slow
def test_float_input_and_output_option(depthwise: tuple, tmp_path: Path) -> None:
    """io="float": a QUANTIZE and a DEQUANTIZE around the same integer model, still bit-exact."""
    qmodel, calib, int8_path, int8_info = depthwise
    path = tmp_path / "kws_float.tflite"
    info = eq.export_tflite(qmodel, path, calib[0][:2], verify_data=calib[:1], io="float")
    assert info.verification.bit_exact == 1.0
    assert info.input_quantization == int8_info.input_quantization
    assert info.ops[0] == "QUANTIZE" and info.ops[-1] == "DEQUANTIZE"
    it = litert_interpreter(path.read_bytes())
    assert it.get_input_details()[0]["dtype"] == np.float32
    assert it.get_output_details()[0]["dtype"] == np.float32
    x = calib[1][:4].numpy()
    as_float = TFLiteRunner(path.read_bytes(), "tflite-micro").run([x])[0]
    as_int8 = TFLiteRunner(int8_path.read_bytes(), "tflite-micro").run([x])[0]
    assert np.array_equal(as_float, as_int8)


def test_resnet_style_shortcut_and_conv1d_export() -> None:
    for name in ("option_a_shortcut", "conv1d"):
        _, qmodel, calib = _mcu(name)
        path = Path(__import__("tempfile").mkdtemp()) / f"{name}.tflite"
        info = eq.export_tflite(qmodel, path, calib[0][:1], verify_data=calib[:1])
        assert info.verification.bit_exact == 1.0, name
        assert path.is_file()
        # The shortcut runs as a convolution (export/selection_conv.py), not STRIDED_SLICE + PAD.
        assert "STRIDED_SLICE" not in info.ops, name


def test_adaptive_avg_pool1d_keyword_spotter_runs_bit_exact() -> None:
    """F.adaptive_avg_pool1d exports as Unsqueeze -> ReduceMean -> Squeeze: the mean and the
    moves around it run on integers (a MEAN in the file), bit-exact in TFLite Micro."""
    _, qmodel, calib = _mcu("ds_cnn_1d")
    path = Path(__import__("tempfile").mkdtemp()) / "kws1d.tflite"
    info = eq.export_tflite(qmodel, path, calib[0][:1], verify_data=calib)
    v = info.verification
    assert v.passed and v.bit_exact == 1.0 and v.top1_agreement == 1.0
    assert "MEAN" in info.ops and "DEPTHWISE_CONV_2D" in info.ops


class Pools1d(nn.Module):
    """1-d max, average and adaptive average pooling of windows between Conv1d layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(2, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool1d(F.relu(self.c1(x)), 2)
        x = F.avg_pool1d(F.relu(self.c2(x)), 2)
        return self.fc(F.adaptive_avg_pool1d(x, 2).flatten(1))


def test_1d_pools_run_bit_exact() -> None:
    """A 1-d average pool keeps its input's grid (TFLite's AVERAGE_POOL_2D has one grid for
    input and output), so TFLite Micro averages the integers the reference averages."""
    torch.manual_seed(0)
    calib = [torch.randn(8, 2, 16) for _ in range(2)]
    qmodel = eq.quantize(Pools1d().eval(), eq.Recipe.preset("w8a8").for_target("mcu-int8"), calib)
    path = Path(__import__("tempfile").mkdtemp()) / "pools1d.tflite"
    info = eq.export_tflite(qmodel, path, calib[0][:1], verify_data=calib)
    assert info.verification.bit_exact == 1.0 and info.verification.top1_agreement == 1.0
    assert {"MAX_POOL_2D", "AVERAGE_POOL_2D"} <= set(info.ops)


class Concat(nn.Module):
    """Two branches concatenated, pooled, classified."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.a(x)), self.b(x)], 1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_a_file_that_differs_is_refused_naming_the_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A converted file that computes something else (here: converted from a copy whose conv
    bias moved) is refused, the user's file untouched, the first differing op named."""
    import copy

    import edgequant.export.tflite as tflite

    torch.manual_seed(0)
    model = Concat().eval()
    calib = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target("mcu-int8"), calib)
    other = copy.deepcopy(qmodel)
    with torch.no_grad():
        other.b.bias += 0.3  # type: ignore[operator]
    convert = tflite._convert
    monkeypatch.setattr(tflite, "_convert", lambda _, one: convert(other, one))
    path = tmp_path / "m.tflite"
    path.write_bytes(b"the user's file")
    with pytest.raises(eq.ExportError, match=r"differ from the integer reference.*op CONV_2D"):
        eq.export_tflite(qmodel, path, calib[0][:1], verify_data=calib)
    assert path.read_bytes() == b"the user's file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]


def test_ops_without_integer_kernel_are_named_with_their_layer() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x))

    program = export_program(Gate().eval(), (torch.randn(1, 4),))
    assert unsupported_nodes(program, TFLITE_OPS) == ["aten.sigmoid (layer 'act')"]


def test_non_fully_integer_target_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    model, calib = ZOO["module_cnn"]()
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8"), calib)
    with pytest.raises(eq.ExportError, match=r"target 'onnxruntime'.*mcu-int8"):
        eq.export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1])
    with pytest.raises(ValueError, match=r"io must be one of 'int8', 'float'"):
        eq.export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1], io="uint8")
    with pytest.raises(ValueError, match=r"must end in \.tflite"):
        eq.export_tflite(qmodel, tmp_path / "m.onnx", calib[0][:1])
    with pytest.raises(ValueError, match="no quantized layer"):
        eq.export_tflite(model, tmp_path / "m.tflite", calib[0][:1])
    with pytest.raises(TypeError, match="float32"):
        eq.export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1].double())


def test_uint8_activation_grid_becomes_int8_with_zero_point_minus_128() -> None:
    q = TensorQuantizer(QuantSpec(bits=8, signed=False, symmetric=False), role="activation")
    q.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    q.set_mode("quantize")
    assert q.zero_point.item() > 0
    pt2e = Pt2eQDQ(LoweredQDQ(q), "q")
    assert pt2e.zero_point == int(q.zero_point.item()) - 128
    x = torch.linspace(-1.5, 3.5, 1001)
    with torch.no_grad():
        assert torch.equal(pt2e(x), q(x))


def _mnist1d_config(tmp_path: Path, target: str) -> Path:
    import yaml

    example = Path(__file__).resolve().parents[2] / "examples" / "mnist1d_cnn.yaml"
    config = yaml.safe_load(example.read_text())
    config["model"] = {
        "function": "edgequant.examples.mnist1d:trained_cnn",
        "kwargs": {"epochs": 2, "cache_dir": str(tmp_path / "cache")},
    }
    config["calib_data"]["kwargs"]["n"] = 128
    del config["eval_data"]
    config["target"] = target
    config["recipes"] = ["w8a8"]
    path = tmp_path / f"{target}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_cli_quantize_writes_tflite_for_a_fully_integer_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgequant.cli import main

    out = tmp_path / "cnn.tflite"
    wrong = _mnist1d_config(tmp_path, "onnxruntime")
    assert main(["quantize", "--config", str(wrong), "--out", str(out), "--quiet"]) == 2
    assert "use a fully integer target (target: mcu-int8)" in capsys.readouterr().err
    assert not out.exists()
    config = _mnist1d_config(tmp_path, "mcu-int8")
    assert main(["quantize", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}") and "TFLite Micro arena" in line
    assert "1.0000 of TFLite Micro's outputs bit-exact" in line
    assert litert_interpreter(out.read_bytes()).get_input_details()[0]["dtype"] == np.int8


def test_four_bit_weights_run_bit_exact_in_int8_containers(tmp_path: Path) -> None:
    """W4A8 for mcu-int8: the 4-bit weights travel in int8 tensors (no TFLite conv takes int4),
    every value on the 4-bit grid, and TFLite Micro still matches the integer reference bit for
    bit; the ONNX file of the same model is fully integer too."""
    model, calib = ZOO["depthwise_separable"]()
    recipe = eq.Recipe.preset("w4a8").for_target("mcu-int8")
    qmodel = eq.quantize(model, recipe, calib, method="static")
    info = eq.export_tflite(qmodel, tmp_path / "w4.tflite", calib[0][:1], verify_data=calib)
    v = info.verification
    assert v.passed and v.bit_exact == 1.0 and v.max_step_difference == 0
    it = litert_interpreter((tmp_path / "w4.tflite").read_bytes())
    weights = [
        it.get_tensor(d["index"])
        for d in it.get_tensor_details()
        if d["dtype"] == np.int8 and len(d["shape"]) == 4 and d["shape"][0] > 1
    ]
    assert weights and all(np.abs(w).max() <= 7 for w in weights)
    onnx_info = eq.export_onnx(qmodel, tmp_path / "w4.onnx", calib[0], verify_data=calib[1:])
    assert onnx_info.fully_integer is True and onnx_info.verification.passed


class PoolThenLinear(nn.Module):
    """Conv1d, a 1-d max pool (window 4, or an adaptive one to `size` positions), flatten, Linear."""

    def __init__(self, size: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool1d(size) if size else nn.MaxPool1d(4)
        self.fc = nn.Linear(8 * (size or 4), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.conv(x))).flatten(1))


def _pooled(size: int | None) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    calib = [torch.randn(4, 2, 16) for _ in range(2)]
    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    return eq.quantize(PoolThenLinear(size).eval(), recipe, calib), calib


@pytest.mark.parametrize("size", [None, 4])
def test_1d_max_pools_before_a_linear_run_bit_exact(size: int | None, tmp_path: Path) -> None:
    """nn.MaxPool1d(4), and nn.AdaptiveMaxPool1d(4) on 16 positions (windows of 4: written as
    that max pool), flattened into a Linear: MAX_POOL_2D in the file, bit-exact in TFLite Micro.
    (TFLite Micro aborts on some arenas too small for this model: the arena search goes on.)"""
    qmodel, calib = _pooled(size)
    info = eq.export_tflite(qmodel, tmp_path / "p.tflite", calib[0][:1], verify_data=calib)
    assert info.verification.bit_exact == 1.0 and info.verification.top1_agreement == 1.0
    assert "MAX_POOL_2D" in info.ops and info.arena_bytes is not None


def test_adaptive_max_pool_of_uneven_windows_is_refused_before_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgequant.export.tflite as tflite

    # 16 positions to 3: windows of 5 and 6. eq.quantize refuses it first; the exporter refuses
    # it too for a model that reached it otherwise.
    with pytest.raises(ValueError, match=r"'adaptive_max_pool1d \(uneven windows\)' at 'pool'"):
        _pooled(3)
    quantize_module = importlib.import_module("edgequant.ptq.quantize")  # not the function
    monkeypatch.setattr(quantize_module, "require_target_fits", lambda *_: None)
    qmodel, calib = _pooled(3)
    monkeypatch.setattr(tflite, "convert_program", lambda *_: pytest.fail("converted"))
    with pytest.raises(eq.ExportError, match=r"aten\.adaptive_max_pool1d \(layer 'pool'\)"):
        eq.export_tflite(qmodel, tmp_path / "p.tflite", calib[0][:1])
    assert not list(tmp_path.iterdir())


def test_nearest_upsampling_runs_bit_exact_as_resize_nearest_neighbor(tmp_path: Path) -> None:
    _, qmodel, calib = _mcu("concat_upsample")
    info = eq.export_tflite(qmodel, tmp_path / "u.tflite", calib[0][:1], verify_data=calib)
    assert info.verification.bit_exact == 1.0
    assert {"RESIZE_NEAREST_NEIGHBOR", "CONCATENATION"} <= set(info.ops)
