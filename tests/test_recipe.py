"""recipe.py: presets resolve as DESIGN §1 says, bad recipes fail at the boundary naming the valid
choices, recipes round-trip through YAML, and specs_for applies overrides and skips in order."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgequant as eq
from edgequant.recipe import Recipe
from edgequant.spec import LayerOverride, QuantSpec, activation_spec, weight_spec

# --- presets ------------------------------------------------------------------------------------

PRESETS = {
    # name: (weight bits, activation bits or None, first_last_bits)
    "w8a8": (8, 8, None),
    "w4a8": (4, 8, 8),
    "w4a4": (4, 4, 8),
    "w2a2": (2, 2, 8),
    "w16a16": (16, 16, None),
    "w4-weight-only": (4, None, 8),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_resolves_to_literature_defaults(name: str) -> None:
    w_bits, a_bits, first_last = PRESETS[name]
    recipe = Recipe.preset(name)
    assert recipe.name == name
    assert recipe.first_last_bits == first_last
    # Weights: symmetric, signed, one scale per output channel.
    w = recipe.weight
    assert w is not None
    assert (w.bits, w.signed, w.symmetric, w.granularity, w.axis) == (
        w_bits,
        True,
        True,
        "channel",
        0,
    )
    assert (w.qmin, w.qmax) == (-(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1)
    if a_bits is None:
        assert recipe.activation is None
        assert recipe.weight_only
        return
    # Activations: asymmetric, unsigned, one scale per tensor.
    a = recipe.activation
    assert a is not None
    assert (a.bits, a.signed, a.symmetric, a.granularity) == (a_bits, False, False, "tensor")
    assert (a.qmin, a.qmax) == (0, 2**a_bits - 1)
    assert not recipe.weight_only


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_str_says_what_it_does(name: str) -> None:
    w_bits, a_bits, first_last = PRESETS[name]
    text = str(Recipe.preset(name))
    assert repr(name) in text
    assert f"int{w_bits} sym per-channel(0)" in text
    if a_bits is None:
        assert "float (weight-only)" in text
    else:
        assert f"uint{a_bits} asym per-tensor" in text
    kept = "first and last quantized layers kept at 8 bits"
    assert (kept in text) == (first_last == 8)


def test_preset_is_reexported_and_hashable() -> None:
    assert eq.Recipe is Recipe and eq.QuantSpec is QuantSpec and eq.LayerOverride is LayerOverride
    assert Recipe.preset("w4a8") == Recipe.preset("w4a8")
    assert len({Recipe.preset("w4a8"), Recipe.preset("w4a8"), Recipe.preset("w8a8")}) == 2


@pytest.mark.parametrize(
    "name", ["w8", "int8", "W8A8", "w8a8 ", "w4-weight", "w8a8-weight-only", "", "a8w8"]
)
def test_unknown_preset_names_the_valid_forms(name: str) -> None:
    with pytest.raises(ValueError) as info:
        Recipe.preset(name)
    message = str(info.value)
    assert repr(name) in message
    assert "w8a8" in message and "w4-weight-only" in message


@pytest.mark.parametrize(
    "name", ["w1a8", "w17a8", "w8a1", "w8a17", "w1-weight-only", "w17-weight-only"]
)
def test_preset_bits_out_of_range(name: str) -> None:
    with pytest.raises(ValueError) as info:
        Recipe.preset(name)
    assert "2..16" in str(info.value)


def test_preset_rejects_non_string() -> None:
    with pytest.raises(TypeError, match="name string"):
        Recipe.preset(8)  # type: ignore[arg-type]


# --- Recipe validation --------------------------------------------------------------------------


def test_recipe_needs_weight_or_activation() -> None:
    with pytest.raises(ValueError, match="neither"):
        Recipe(weight=None, activation=None)


def test_recipe_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match=r"2\.\.16"):
        Recipe(first_last_bits=1)
    with pytest.raises(ValueError, match="onnxruntime"):
        Recipe(target="gpu")
    with pytest.raises(ValueError, match="onnxruntime"):
        Recipe.preset("w8a8").for_target("tflite-int7")
    with pytest.raises(ValueError, match="calib_samples"):
        Recipe(calib_samples=0)
    with pytest.raises(TypeError, match="QuantSpec"):
        Recipe(weight={"bits": 8})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LayerOverride"):
        Recipe(overrides=("fc",))  # type: ignore[arg-type]


def test_recipe_lists_become_tuples() -> None:
    recipe = Recipe(overrides=[LayerOverride("fc", skip=True)], skip=["head"])  # type: ignore[arg-type]
    assert recipe.overrides == (LayerOverride("fc", skip=True),)
    assert recipe.skip == ("head",)
    hash(recipe)


# --- YAML round trip ----------------------------------------------------------------------------


def _rich_recipe() -> Recipe:
    return Recipe(
        name="mixed",
        weight=weight_spec(4),
        activation=activation_spec(8, observer="percentile"),
        overrides=(
            LayerOverride("features.0", weight=weight_spec(8), activation=activation_spec(8)),
            LayerOverride("Linear", weight=weight_spec(4, group_size=32)),
            LayerOverride("*.downsample.*", skip=True),
            LayerOverride(
                "head", activation=QuantSpec(bits=8, narrow_range=True, scale_type="pow2")
            ),
        ),
        skip=("classifier", "Embedding"),
        first_last_bits=8,
        calib_samples=128,
        quantize_outputs=False,
        smooth_alpha=0.5,
    )


@pytest.mark.parametrize(
    "recipe",
    [_rich_recipe(), *(Recipe.preset(name) for name in sorted(PRESETS))],
    ids=["rich", *sorted(PRESETS)],
)
def test_yaml_round_trip_from_text(recipe: Recipe) -> None:
    text = recipe.to_yaml()
    back = Recipe.from_yaml(text)
    assert back == recipe
    assert str(back) == str(recipe)
    assert back.to_yaml() == text


def test_yaml_text_is_readable() -> None:
    text = _rich_recipe().to_yaml()
    assert "name: mixed" in text
    assert "pattern: '*.downsample.*'" in text
    assert "smooth_alpha: 0.5" in text


def test_str_lists_overrides_and_skips() -> None:
    text = str(_rich_recipe())
    assert "override features.0: weight=int8 sym per-channel(0)" in text
    assert "override *.downsample.*: skip" in text
    assert "skip: classifier, Embedding" in text
    assert "first and last quantized layers kept at 8 bits" in text


def test_yaml_from_file_written_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(_rich_recipe().to_yaml())
    assert Recipe.from_yaml(path) == _rich_recipe()
    assert Recipe.from_yaml(str(path)) == _rich_recipe()


def test_yaml_round_trip_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    text = _rich_recipe().to_yaml(path)
    assert path.read_text() == text
    assert Recipe.from_yaml(path) == _rich_recipe()
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_yaml_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        Recipe.from_yaml(missing)
    assert "missing.yaml" in str(info.value)


def test_from_dict_rejects_unknown_keys_and_non_mappings() -> None:
    data = Recipe.preset("w8a8").to_dict()
    data["wieght"] = None
    with pytest.raises(ValueError) as info:
        Recipe.from_dict(data)
    assert "wieght" in str(info.value) and "weight" in str(info.value)
    with pytest.raises(TypeError, match="mapping"):
        Recipe.from_yaml("- a\n- b\n")


# --- specs_for ----------------------------------------------------------------------------------


def test_specs_for_without_overrides_returns_defaults() -> None:
    recipe = Recipe.preset("w4a8")
    assert recipe.specs_for("conv1", "Conv2d") == (recipe.weight, recipe.activation, None)


def test_specs_for_override_by_name_glob() -> None:
    w8 = weight_spec(8)
    recipe = Recipe.preset("w4a4").replace(overrides=(LayerOverride("layer1.*.conv1", weight=w8),))
    weight, activation, reason = recipe.specs_for("layer1.0.conv1", "Conv2d")
    assert (weight, activation, reason) == (w8, recipe.activation, None)  # activation kept
    assert recipe.specs_for("layer1.0.conv2", "Conv2d")[0] == recipe.weight
    assert recipe.specs_for("layer2.0.conv1", "Conv2d")[0] == recipe.weight


def test_specs_for_override_by_type_name() -> None:
    a16 = activation_spec(16)
    recipe = Recipe.preset("w8a8").replace(overrides=(LayerOverride("Linear", activation=a16),))
    assert recipe.specs_for("head", "Linear") == (recipe.weight, a16, None)
    assert recipe.specs_for("conv", "Conv2d") == (recipe.weight, recipe.activation, None)
    # A type name is matched exactly, not as a substring of another type.
    assert recipe.specs_for("x", "LinearAttention")[1] == recipe.activation


def test_specs_for_later_overrides_win() -> None:
    w2, w6 = weight_spec(2), weight_spec(6)
    recipe = Recipe.preset("w8a8").replace(
        overrides=(LayerOverride("Conv2d", weight=w2), LayerOverride("stem.*", weight=w6))
    )
    assert recipe.specs_for("stem.conv", "Conv2d")[0] == w6
    assert recipe.specs_for("body.conv", "Conv2d")[0] == w2


def test_specs_for_skip_list_and_skip_override_give_reasons() -> None:
    recipe = Recipe.preset("w8a8").replace(
        skip=("classifier", "Conv1d"), overrides=(LayerOverride("blocks.*.proj", skip=True),)
    )
    weight, activation, reason = recipe.specs_for("classifier", "Linear")
    assert weight is None and activation is None
    assert reason is not None and "skip list" in reason and "classifier" in reason
    assert recipe.specs_for("stem", "Conv1d")[2] is not None  # skip by type name
    weight, activation, reason = recipe.specs_for("blocks.3.proj", "Linear")
    assert weight is None and activation is None
    assert reason is not None and "blocks.*.proj" in reason
    assert recipe.specs_for("blocks.3.fc", "Linear")[2] is None


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"skip": "head"}, TypeError, r"Recipe\.skip must be a list.*got 'head'"),
        ({"skip": None}, TypeError, r"Recipe\.skip must be a list.*got None"),
        ({"overrides": LayerOverride("fc", skip=True)}, TypeError, "got LayerOverride"),
        ({"quantize_outputs": "no"}, TypeError, r"quantize_outputs must be true or false"),
        ({"calib_samples": True}, ValueError, r"calib_samples must be a positive int, got True"),
        ({"first_last_bits": 8.0}, ValueError, r"first_last_bits=8\.0 must be an int in 2\.\.16"),
        ({"name": None}, TypeError, r"Recipe\.name must be a string, got None"),
        ({"target": ["tensorrt"]}, ValueError, r"target=\['tensorrt'\] is unknown; known"),
    ],
)
def test_recipe_fields_of_the_wrong_type_are_named(
    changes: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Recipe(**changes)


def test_for_target_of_the_wrong_type_lists_the_targets() -> None:
    with pytest.raises(ValueError, match=r"unknown target \['tensorrt'\]; known targets: onnx"):
        Recipe().for_target(["tensorrt"])  # type: ignore[arg-type]


# --- Recipe.from_dict / from_yaml / to_yaml -------------------------------------------------------


def test_a_mapping_without_activation_keeps_the_default_activations() -> None:
    # Omitted keys take the field's default, as for every other key; `activation: null` is
    # weight-only. It used to turn a W4A8 recipe into a weight-only one, silently.
    recipe = Recipe.from_yaml("name: mine\nweight: {bits: 4, granularity: channel}\n")
    assert recipe.activation == Recipe().activation
    assert Recipe.from_yaml("name: mine\nactivation: {bits: 4}\n").weight == Recipe().weight
    assert Recipe.from_yaml("name: mine\nactivation: null\n").weight_only


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ("- {weight: {bits: 4}}", TypeError, r"overrides\[0\] must be a mapping with a 'pattern'"),
        (
            "- {pattern: fc, bitz: 4}",
            ValueError,
            r"overrides\[0\] \('fc'\): unknown keys \['bitz'\]",
        ),
        ("- {pattern: fc, skip: 'false'}", TypeError, r"skip must be true or false, got 'false'"),
        ("fc", TypeError, r"overrides must be a list of mappings.*got 'fc'"),
        ("[fc]", TypeError, r"overrides\[0\] must be a mapping.*got 'fc'"),
    ],
)
def test_yaml_overrides_are_checked(overrides: str, error: type[Exception], message: str) -> None:
    sep = "\n  " if overrides.startswith("-") else " "
    with pytest.raises(error, match=message):
        Recipe.from_yaml(f"name: x\noverrides:{sep}{overrides}\n")


def test_yaml_null_overrides_and_skip_are_empty() -> None:
    recipe = Recipe.from_yaml("name: x\noverrides:\nskip:\n")
    assert recipe.overrides == () and recipe.skip == ()


def test_yaml_from_a_folder_a_binary_file_or_a_non_path(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder"):
        Recipe.from_yaml(tmp_path)
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(b"\xff\xfe\x00 binary")
    with pytest.raises(ValueError, match=r"recipe\.yaml is not a YAML text file"):
        Recipe.from_yaml(binary)
    with pytest.raises(TypeError, match="expects a file path or YAML text, got NoneType"):
        Recipe.from_yaml(None)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="YAML text needs a newline"):
        Recipe.from_yaml("name: x")


def test_to_yaml_into_a_folder_names_it_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder; give a file path"):
        Recipe.preset("w8a8").to_yaml(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_recipe_fields_validate_and_round_trip() -> None:
    r = eq.Recipe.preset("w4a8").replace(rounding="adaround", equalize=True, bias_correction=False)
    assert eq.Recipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(ValueError, match="rounding"):
        eq.Recipe(rounding="stochastic")
    with pytest.raises(ValueError, match="equalize"):
        eq.Recipe(equalize="yes")  # type: ignore[arg-type]
    r = eq.Recipe.preset("w4-weight-only").replace(block_int8_inputs=False)
    assert eq.Recipe.from_yaml(r.to_yaml()).block_int8_inputs is False
    with pytest.raises(ValueError, match="block_int8_inputs"):
        eq.Recipe(block_int8_inputs="auto")  # type: ignore[arg-type]
