"""Hardware targets (targets.TARGETS): the grid rules each target applies to a recipe, and the end to
end check that each target's W8A8 recipe quantizes, exports and verifies in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn
from toys import small_resnet_case  # tests/toys.py

import edgequant as eq
from edgequant.export.integer_graph import constant_arrays
from edgequant.recipe import Recipe
from edgequant.spec import LayerOverride, QuantSpec
from edgequant.targets import TARGETS, Target

ALL_TARGETS = ("onnxruntime", "tflite-int8", "tensorrt", "dsp-pow2", "mcu-int8", "executorch")


# --------------------------------------------------------------------------- the rules, as data


def test_registry_holds_the_six_targets_as_frozen_dataclasses() -> None:
    assert tuple(TARGETS) == ALL_TARGETS
    for name, target in TARGETS.items():
        assert isinstance(target, Target) and target.name == name
        assert target.description
        with pytest.raises(AttributeError):
            target.name = "x"  # type: ignore[misc]


def test_only_mcu_is_fully_integer() -> None:
    assert [name for name, t in TARGETS.items() if t.fully_integer] == ["mcu-int8"]
    assert "Not yet" not in TARGETS["mcu-int8"].description


def test_unknown_target_is_a_value_error_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown target 'gpu'") as err:
        Recipe.preset("w8a8").for_target("gpu")
    for name in ALL_TARGETS:
        assert name in str(err.value)


def test_onnxruntime_keeps_the_recipe() -> None:
    recipe = Recipe.preset("w8a8")
    assert recipe.for_target("onnxruntime") == recipe
    custom = recipe.replace(activation=QuantSpec(bits=8, signed=True, symmetric=True))
    assert custom.for_target("onnxruntime") == custom


@pytest.mark.parametrize("name", ["tflite-int8", "mcu-int8"])
def test_tflite_grids(name: str) -> None:
    recipe = Recipe.preset("w8a8").for_target(name)
    w, a = recipe.weight, recipe.activation
    assert recipe.target == name
    assert (w.signed, w.symmetric, w.narrow_range, w.granularity, w.axis) == (
        True,
        True,
        True,
        "channel",
        0,
    )
    assert (w.qmin, w.qmax) == (-127, 127)
    assert (a.signed, a.symmetric, a.granularity) == (True, False, "tensor")
    assert (a.qmin, a.qmax) == (-128, 127)


def test_tensorrt_grids() -> None:
    recipe = Recipe.preset("w8a8").for_target("tensorrt")
    w, a = recipe.weight, recipe.activation
    assert (w.signed, w.symmetric, w.granularity) == (True, True, "channel")
    assert (a.signed, a.symmetric, a.granularity) == (True, True, "tensor")


def test_dsp_pow2_grids() -> None:
    recipe = Recipe.preset("w8a8").for_target("dsp-pow2")
    assert recipe.weight.scale_type == "pow2" and recipe.activation.scale_type == "pow2"
    assert recipe.weight.symmetric and recipe.activation.symmetric


@pytest.mark.parametrize("name", ALL_TARGETS)
def test_bit_widths_first_last_bits_and_observer_are_kept(name: str) -> None:
    base = Recipe.preset("w4a8")
    base = base.replace(activation=base.activation.replace(observer="percentile"))
    recipe = base.for_target(name)
    assert recipe.weight.bits == 4 and recipe.activation.bits == 8
    assert recipe.first_last_bits == 8
    assert recipe.activation.observer == "percentile"
    assert recipe.name == "w4a8" and recipe.calib_samples == base.calib_samples


@pytest.mark.parametrize("name", ALL_TARGETS)
def test_weight_only_stays_weight_only(name: str) -> None:
    recipe = Recipe.preset("w4-weight-only").for_target(name)
    assert recipe.weight_only and recipe.weight.bits == 4


def test_overrides_are_rewritten_too() -> None:
    base = Recipe.preset("w8a8").replace(
        overrides=(
            LayerOverride("head", weight=QuantSpec(bits=6, granularity="tensor")),
            LayerOverride("stem", activation=QuantSpec(bits=6, signed=False, symmetric=False)),
            LayerOverride("conv1", skip=True),
        )
    )
    recipe = base.for_target("tflite-int8")
    head, stem, conv1 = recipe.overrides
    assert head.weight == QuantSpec(bits=6, narrow_range=True, granularity="channel")
    assert head.activation is None
    assert stem.activation == QuantSpec(bits=6, signed=True, symmetric=False)
    assert conv1.skip and conv1.weight is None and conv1.activation is None
    pow2 = base.for_target("dsp-pow2")
    assert pow2.overrides[0].weight.scale_type == "pow2"
    assert pow2.overrides[1].activation.scale_type == "pow2"
    assert pow2.overrides[1].activation.bits == 6


@pytest.mark.parametrize("name", ALL_TARGETS)
def test_yaml_round_trip_keeps_the_target(name: str) -> None:
    recipe = Recipe.preset("w4a8").for_target(name)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.target == name


def test_retargeting_is_idempotent() -> None:
    for name in ALL_TARGETS:
        once = Recipe.preset("w8a8").for_target(name)
        assert once.for_target(name) == once


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def residual() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    return small_resnet_case(64)


def qdq_scales(path: Path) -> dict[str, np.ndarray]:
    """Every scale initializer read by a QuantizeLinear or DequantizeLinear, by name."""
    graph = onnx.load(str(path)).graph
    # Constant nodes hold scales too when the exporter does not fold them into initializers.
    inits = constant_arrays(graph)
    scales = {}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scales[node.input[1]] = inits[node.input[1]]
    return scales


def not_pow2(values: np.ndarray) -> int:
    mantissa, _ = np.frexp(values.astype(np.float64))
    return int((mantissa != 0.5).sum())


@pytest.mark.parametrize("name", ALL_TARGETS)
def test_w8a8_quantizes_exports_and_verifies(name: str, residual: tuple, tmp_path: Path) -> None:
    model, calib, test = residual
    recipe = Recipe.preset("w8a8").for_target(name)
    qmodel = eq.quantize(model, recipe, calib)
    path = tmp_path / f"{name}.onnx"
    info = eq.export_onnx(qmodel, path, test[:4], verify_data=[test])
    assert info.verification.passed
    assert info.verification.top1_agreement >= 0.98
    scales = qdq_scales(path)
    assert scales, "no QDQ scales in the exported graph"
    zero_points = _qdq_zero_points(path)
    if name in ("tensorrt", "dsp-pow2"):
        # symmetric everywhere: every zero point of the graph is 0
        assert all((zp == 0).all() for zp in zero_points)
    if name in ("tflite-int8", "mcu-int8", "tensorrt", "dsp-pow2", "executorch"):
        # signed activations: no UINT8 tensor anywhere
        assert all(zp.dtype != np.uint8 for zp in zero_points)
    if name == "dsp-pow2":
        assert sum(not_pow2(s) for s in scales.values()) == 0
    else:
        # the check can fail: float scales are almost never powers of two
        assert sum(not_pow2(s) for s in scales.values()) > 0


def _qdq_zero_points(path: Path) -> list[np.ndarray]:
    graph = onnx.load(str(path)).graph
    inits = constant_arrays(graph)
    return [
        inits[node.input[2]]
        for node in graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2
        if node.input[2]
    ]


class SliceShortcut(nn.Module):
    """ResNet-20's option-A shortcut: strided slice, zero-pad channels, add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch_F.relu(self.stem(x))
        shortcut = torch_F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4), "constant", 0.0)
        x = torch_F.relu(self.conv(x) + shortcut)
        return self.head(torch_F.adaptive_avg_pool2d(x, 1).flatten(1))


# ONNX Runtime 1.32 mislabels the zero point of a QuantizeLinear it propagates across a Slice
# itself; edgequant re-quantizes after every data-movement step, so ORT has nothing to propagate.
@pytest.mark.parametrize("name", ["tflite-int8", "tensorrt"])
def test_signed_activations_through_a_slice_shortcut(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SliceShortcut().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 12, 12, generator=g) for _ in range(2)]
    qmodel = eq.quantize(model, Recipe.preset("w8a8").for_target(name), calib)
    info = eq.export_onnx(qmodel, tmp_path / "m.onnx", calib[0][:4])
    assert info.verification.passed


def test_slice_shortcut_under_onnxruntime_exports(tmp_path: Path) -> None:
    """The same graph with UINT8 activations loads: the failure above is the signed grid's."""
    torch.manual_seed(0)
    model = SliceShortcut().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 12, 12, generator=g) for _ in range(2)]
    qmodel = eq.quantize(model, Recipe.preset("w8a8"), calib)
    assert eq.export_onnx(qmodel, tmp_path / "m.onnx", calib[0][:4]).verification.passed
