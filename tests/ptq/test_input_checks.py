"""Bad input to eq.quantize, eq.load and eq.check fails at the boundary with an error that names
the argument, the value (a batch's shapes, a layer, a file) and the valid choices, instead of a
torch error from deep inside or a silently different result."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.recipe import Recipe
from edgequant.spec import LayerOverride, QuantSpec


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4)
    ).eval()


def _x(rows: int = 16, features: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


# --- calibration batches that do not fit the model ----------------------------------------------


@pytest.mark.parametrize("method", ["static", "dynamic", "weight_only"])
def test_first_batch_of_the_wrong_shape_names_the_item_and_its_shape(method: str) -> None:
    recipe = "w8-weight-only" if method == "weight_only" else "w8a8"
    with pytest.raises(ValueError, match=r"calib_data item 0 \(a Tensor \(4, 7\) float32\)"):
        eq.quantize(_mlp(), recipe, [_x(4, 7)], method=method)


def test_first_batch_of_the_wrong_dtype_names_it() -> None:
    batch = torch.randint(0, 3, (4, 8))
    with pytest.raises(ValueError, match=r"calib_data item 0 \(a Tensor \(4, 8\) int64\)"):
        eq.quantize(_mlp(), "w8a8", [batch])


@pytest.mark.parametrize(
    "recipe",
    [Recipe.preset("w8a8"), Recipe.preset("w8a8").replace(smooth_alpha=0.5), "w4a8"],
    ids=["calibration", "smoothquant", "gptq"],
)
def test_later_batch_of_the_wrong_shape_names_its_index(recipe: Recipe | str) -> None:
    with pytest.raises(ValueError, match=r"calib_data item 2 \(a Tensor \(3, 5\) float32\)"):
        eq.quantize(_mlp(), recipe, [_x(), _x(seed=1), _x(3, 5)])


def test_non_finite_batch_is_named_before_dynamic_smoothquant_reads_it() -> None:
    recipe = Recipe.preset("w8a8").replace(smooth_alpha=0.5)
    bad = _x(seed=1)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration item 1 holds NaN or Inf"):
        eq.quantize(_mlp(), recipe, [_x(), bad], method="dynamic")


# --- recipes that do not fit the model ----------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "kind"),
    [
        (Recipe.preset("w8a8").replace(skip=("fc9",)), "skip"),
        (Recipe.preset("w8a8").replace(overrides=(LayerOverride("fc9", skip=True),)), "override"),
    ],
)
def test_pattern_that_matches_no_layer_is_refused(recipe: Recipe, kind: str) -> None:
    model = _mlp()
    with pytest.raises(ValueError) as info:
        eq.quantize(model, recipe, [_x()])
    message = str(info.value)
    assert f"{kind} pattern 'fc9' matches no module" in message
    assert "module names: 0, 1, 2, 3, 4" in message and "Linear" in message
    # Names, globs and type names that exist are accepted.
    for pattern in ("2", "[24]", "ReLU"):
        eq.quantize(model, Recipe.preset("w8a8").replace(skip=(pattern,)), [_x()])


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_weight_axis_that_is_not_a_dim_names_the_layer(granularity: str) -> None:
    spec = QuantSpec(
        bits=8, granularity=granularity, axis=3, group_size=4 if granularity == "group" else None
    )
    recipe = Recipe.preset("w8a8").replace(weight=spec)
    with pytest.raises(ValueError, match=r"layer '0'.*axis 3.*shape \(12, 8\); valid axes: 0\.\.1"):
        eq.quantize(_mlp(), recipe, [_x()])


# --- arguments of quantize ----------------------------------------------------------------------


def test_method_that_is_not_a_string_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method \['static'\]; valid: static, dynamic"):
        eq.quantize(_mlp(), "w8a8", [_x()], method=["static"])  # type: ignore[arg-type]


def test_num_samples_true_is_not_one_sample() -> None:
    with pytest.raises(ValueError, match="num_samples must be a positive int, got True"):
        eq.quantize(_mlp(), "w8a8", [_x()], num_samples=True)


# --- eq.load ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = _mlp()
    path = tmp_path_factory.mktemp("load") / "q.pt"
    torch.save(eq.quantize(model, "w8a8", [_x()]).state_dict(), path)
    return model, path


def test_load_of_a_file_that_is_not_a_state_dict_names_the_file(
    saved: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    model, _ = saved
    junk = tmp_path / "notes.pt"
    junk.write_text("not a torch file")
    with pytest.raises(ValueError, match=r"notes\.pt is not a saved state_dict"):
        eq.load(model, "w8a8", junk, _x())
    pickled = tmp_path / "model.pt"
    with pickled.open("wb") as f:
        pickle.dump({"a": object()}, f)
    with pytest.raises(ValueError, match=r"model\.pt is not a saved state_dict.*objects other"):
        eq.load(model, "w8a8", pickled, _x())


def test_load_of_a_folder_says_it_is_a_folder(saved: tuple[nn.Module, Path]) -> None:
    model, path = saved
    with pytest.raises(IsADirectoryError, match=f"{path.parent} is a folder"):
        eq.load(model, "w8a8", path.parent, _x())


def test_load_without_example_inputs_says_they_are_required(
    saved: tuple[nn.Module, Path],
) -> None:
    model, path = saved
    with pytest.raises(ValueError, match="example_inputs is required"):
        eq.load(model, "w8a8", path, None)


def test_load_with_example_inputs_of_the_wrong_shape_names_them(
    saved: tuple[nn.Module, Path],
) -> None:
    model, path = saved
    with pytest.raises(ValueError, match=r"failed on example_inputs \(a Tensor \(2, 7\) float32\)"):
        eq.load(model, "w8a8", path, _x(2, 7))


def test_load_of_a_smoothing_buffer_for_a_missing_layer_names_the_key(
    saved: tuple[nn.Module, Path],
) -> None:
    model, path = saved
    state = torch.load(path, weights_only=True)
    state["9.input_smooth_inv"] = torch.ones(8)
    with pytest.raises(ValueError, match=r"holds '9\.input_smooth_inv'.*no layer '9'"):
        eq.load(model, "w8a8", state, _x())


@pytest.mark.parametrize(("saved_with", "asked"), [("static", "dynamic"), ("dynamic", "static")])
def test_load_with_the_other_of_static_and_dynamic_is_refused(saved_with: str, asked: str) -> None:
    model = _mlp()
    state = eq.quantize(model, "w8a8", [_x()], method=saved_with).state_dict()
    with pytest.raises(ValueError, match=f"quantized with method '{saved_with}'.*method='{asked}'"):
        eq.load(model, "w8a8", state, _x(), method=asked)
    eq.load(model, "w8a8", state, _x(), method=saved_with)


# --- eq.check -----------------------------------------------------------------------------------


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


def test_check_with_a_recipe_as_target_says_a_name_is_needed() -> None:
    with pytest.raises(TypeError, match=r"target must be a target name.*'onnxruntime'.*got Recipe"):
        eq.check(_mlp(), Recipe.preset("w8a8"))  # type: ignore[arg-type]


def test_check_with_example_inputs_of_the_wrong_shape_names_them() -> None:
    with pytest.raises(ValueError, match=r"failed on example_inputs \(a Tensor \(2, 7\) float32\)"):
        eq.check(_Untraceable(), "mcu-int8", _x(2, 7))
    result = eq.check(_mlp(), "mcu-int8", _x(2, 7))
    assert any("mat1 and mat2 shapes cannot be multiplied" in n for n in result.notes)


def test_an_activation_axis_out_of_range_names_the_quantizer_and_its_spec() -> None:
    # Before: "axis 5 out of range for a tensor of shape (16, 8)" from functional.py, no layer.
    spec = QuantSpec(bits=8, symmetric=False, granularity="channel", axis=5)
    recipe = Recipe.preset("w8a8").replace(activation=spec)
    with pytest.raises(
        ValueError,
        match=r"'0.input' \(activation quantizer, .*per-channel\(5\).*\): axis 5 out of range "
        r"for a tensor of shape \(16, 8\)",
    ):
        eq.quantize(_mlp(), recipe, [_x()])
