"""eq.quantize end to end on tiny models: every method, the caller's model left bit-identical,
the summary, calibration errors that say where, keyword inputs, and graph-level quantizers with
the fallback for models torch.fx cannot trace; bad input to eq.quantize and eq.load refused at
the boundary with an error naming the argument, the value and the valid choices; eq.load of a
saved state_dict computing the same. (Empty data, sample counts and determinism of calibration:
test_calibrate.py.)"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from toys import (  # tests/toys.py
    QUANTIZE_MODELS,
    EmbedNorm,
    Untraceable,
    bitwise_equal,
    gen,
    quantize_case,
    randn_rows,
    relu_mlp,
    run_item,
    tensor_batches,
)

import edgequant as eq
from edgequant.functional import sqnr_db
from edgequant.instrument import quant_layers
from edgequant.quantizer import quantizers
from edgequant.recipe import Recipe
from edgequant.spec import LayerOverride, QuantSpec

# Measured on these models: static 39-49 dB, dynamic 40-56 dB, weight-only 45-59 dB at W8A8.
MIN_SQNR_DB = {"static": 35.0, "dynamic": 35.0, "weight_only": 40.0}


@pytest.mark.parametrize("method", ["static", "dynamic", "weight_only"])
@pytest.mark.parametrize("name", sorted(QUANTIZE_MODELS))
def test_each_method_on_each_toy_model(name: str, method: str) -> None:
    model, calib, test = quantize_case(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = run_item(model, test)

    qmodel = eq.quantize(model, "w8a8", calib, method=method)

    # The caller's model is bit-identical: parameters, buffers and outputs.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(
        bitwise_equal(before[k], after[k]) if v.is_floating_point() else torch.equal(before[k], v)
        for k, v in after.items()
    )
    assert bitwise_equal(run_item(model, test), expected)
    assert not any(True for _ in quant_layers(model))

    assert sqnr_db(expected, run_item(qmodel, test)) > MIN_SQNR_DB[method]
    info = qmodel.quant_info
    assert info["method"] == method and info["labels_used"] is False
    n_calib = sum(
        next(iter(item.values())).shape[0] if isinstance(item, dict) else item.shape[0]
        for item in calib
    )
    # Dynamic quantization reads the data too: the outlier inspection of the Linear inputs.
    assert info["samples_used"] == (n_calib if method in ("static", "dynamic") else 0)
    assert info["wall_s"] > 0
    summary = qmodel.quant_summary
    assert summary.method == method and summary.recipe == "w8a8"
    modes = {q.role: set() for q in quantizers(qmodel)}
    for q in quantizers(qmodel):
        modes[q.role].add(q.mode)
    assert modes["weight"] == {"quantize"}
    assert (
        modes.get("activation", set())
        == {"static": {"quantize"}, "dynamic": {"dynamic"}, "weight_only": set()}[method]
    )


def test_dynamic_keeps_convs_in_float_with_a_reason() -> None:
    model, calib, _ = quantize_case("cnn")
    summary = eq.quantize(model, "w8a8", calib, method="dynamic").quant_summary
    assert [r.name for r in summary.quantized] == ["fc"]
    reasons = {r.name: r.reason for r in summary.skipped}
    assert set(reasons) == {"conv1", "dw"}
    assert all("covers Linear, Embedding only" in why for why in reasons.values())
    assert (
        "conv1" in summary.format()
        and "float: dynamic quantization covers Linear, Embedding only" in summary.format()
    )


@pytest.mark.parametrize("method", ["static", "dynamic", "weight_only"])
def test_summary_quantizes_embeddings_and_lists_layernorm_as_float(method: str) -> None:
    torch.manual_seed(0)
    calib = [torch.randint(0, 20, (4, 7), generator=gen(i)) for i in range(2)]
    summary = eq.quantize(EmbedNorm().eval(), "w8a8", calib, method=method).quant_summary
    # Embedding tables take integer weights (one scale per row); their inputs are indices.
    assert [r.name for r in summary.quantized] == ["emb", "fc"]
    emb = next(r for r in summary.quantized if r.name == "emb")
    assert emb.weight.startswith("int8") and emb.activation == "float"
    reasons = {r.name: r.reason for r in summary.skipped}
    assert set(reasons) == {"norm"}
    assert all(reasons.values())


def test_w4a4_keeps_first_and_last_layers_at_8_bits() -> None:
    model, calib, test = quantize_case("cnn")
    qmodel = eq.quantize(model, "w4a4", calib)
    bits = {
        n: (m.weight_quantizer.spec.bits, m.input_quantizer.spec.bits)
        for n, m in quant_layers(qmodel)
    }
    assert bits == {"conv1": (8, 8), "dw": (4, 4), "fc": (8, 8)}
    # The dw layer's weights really sit on a 4-bit grid: at most 16 distinct values per channel.
    dw = qmodel.get_submodule("dw")
    w_q = dw.weight_quantizer(dw.weight)
    assert max(len(torch.unique(row)) for row in w_q.flatten(1)) <= 16
    assert sqnr_db(run_item(model, test), run_item(qmodel, test)) > 20.0


# --- calibration errors -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("index", [0, 2])
def test_non_finite_calibration_input_names_the_item(bad: float, index: int) -> None:
    model, calib, _ = quantize_case("mlp")
    calib[index][1, 3] = bad
    with pytest.raises(ValueError, match=rf"calibration item {index} holds NaN or Inf"):
        eq.quantize(model, "w8a8", calib)


def test_non_finite_keyword_input_names_the_item() -> None:
    model, calib, _ = quantize_case("keywords")
    calib[1]["gain"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration item 1"):
        eq.quantize(model, "w8a8", calib)


class BlowsUp(nn.Module):
    """exp() in the middle overflows to inf for large inputs; fc2 reads the inf."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.exp(self.fc1(x)))))


def test_inf_inside_the_model_names_the_layer() -> None:
    torch.manual_seed(0)
    model = BlowsUp().eval()
    calib = [torch.randn(2, 4, generator=gen(1)), torch.randn(2, 4, generator=gen(2)) * 1e4]
    assert not torch.isfinite(model(calib[1])).all()
    with pytest.raises(ValueError, match=r"layer 'fc2\.input'.*NaN or Inf"):
        eq.quantize(model, "w8a8", calib)
    # On sane inputs the same model quantizes.
    eq.quantize(model, "w8a8", calib[:1])


def test_model_without_quantizable_layer_raises() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.GELU())
    with pytest.raises(ValueError, match="no quantizable layer"):
        eq.quantize(model, "w8a8", [torch.randn(2, 4)])


def test_inputs_and_labels_loader_gives_a_hint() -> None:
    model, calib, _ = quantize_case("mlp")
    loader = [(x, torch.randint(0, 4, (x.shape[0],), generator=gen(3))) for x in calib]
    with pytest.raises(TypeError) as info:
        eq.quantize(model, "w8a8", loader)
    message = str(info.value)
    assert "labels" in message and "calibration item 0" in message


def test_dataloader_of_inputs_only_works() -> None:
    model, calib, test = quantize_case("mlp")
    loader = DataLoader(TensorDataset(torch.cat(calib)), batch_size=5, shuffle=False)
    qmodel = eq.quantize(model, "w8a8", loader)
    assert qmodel.quant_info["samples_used"] == 16
    assert sqnr_db(run_item(model, test), run_item(qmodel, test)) > 35.0


# --- arguments ----------------------------------------------------------------------------------


def test_bad_arguments_name_the_valid_choices() -> None:
    model, calib, _ = quantize_case("mlp")
    with pytest.raises(ValueError) as info:
        eq.quantize(model, "w8a8", calib, method="qat")
    assert all(m in str(info.value) for m in ("static", "dynamic", "weight_only"))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        eq.quantize(lambda x: x, "w8a8", calib)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Recipe"):
        eq.quantize(model, 8, calib)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="w8a8"):
        eq.quantize(model, "int8", calib)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_samples"):
            eq.quantize(model, "w8a8", calib, num_samples=bad)  # type: ignore[arg-type]


def test_methods_refuse_recipes_they_cannot_run() -> None:
    model, calib, _ = quantize_case("mlp")
    with pytest.raises(ValueError, match="weight_only"):
        eq.quantize(model, "w4-weight-only", calib, method="static")
    with pytest.raises(ValueError, match="8-bit activations"):
        eq.quantize(model, "w4a4", calib, method="dynamic")


def test_dict_of_keyword_tensors_calibrates() -> None:
    model, calib, test = quantize_case("keywords")
    qmodel = eq.quantize(model, "w8a8", calib, num_samples=60)
    assert qmodel.quant_info["samples_used"] == 60
    assert {r.name for r in qmodel.quant_summary.quantized} == {"proj", "out"}
    assert all(q.calibrated for q in quantizers(qmodel))
    assert sqnr_db(run_item(model, test), run_item(qmodel, test)) > 35.0


# --- graph-level quantizers ---------------------------------------------------------------------


def test_quantize_outputs_off_keeps_a_plain_module() -> None:
    model, calib, _ = quantize_case("residual")
    recipe = eq.Recipe.preset("w8a8").replace(quantize_outputs=False)
    qmodel = eq.quantize(model, recipe, calib)
    assert not isinstance(qmodel, torch.fx.GraphModule)
    assert all(r.output == "float" for r in qmodel.quant_summary.layers)


def test_untraceable_model_still_quantizes_with_a_note() -> None:
    torch.manual_seed(0)
    model = Untraceable().eval()
    calib = tensor_batches((8, 4), 4, seed=5)
    test = torch.randn(16, 4, generator=gen(6))
    qmodel = eq.quantize(model, "w8a8", calib)
    assert not isinstance(qmodel, torch.fx.GraphModule)
    assert isinstance(qmodel, Untraceable)
    notes = qmodel.quant_summary.notes
    assert "torch.fx could not trace" in notes[0]
    assert all(n.startswith("reduce_range: ") for n in notes[1:])
    assert {r.name for r in qmodel.quant_summary.quantized} == {"a", "b"}
    assert qmodel.quant_info["samples_used"] == 32
    assert sqnr_db(run_item(model, test), run_item(qmodel, test)) > 35.0


@pytest.mark.parametrize("method", ["static", "dynamic", "weight_only"])
def test_first_batch_of_the_wrong_shape_names_the_item_and_its_shape(method: str) -> None:
    recipe = "w8-weight-only" if method == "weight_only" else "w8a8"
    with pytest.raises(ValueError, match=r"calib_data item 0 \(a Tensor \(4, 7\) float32\)"):
        eq.quantize(relu_mlp(8, 12, 12, 4), recipe, [randn_rows(4, 7)], method=method)


def test_first_batch_of_the_wrong_dtype_names_it() -> None:
    batch = torch.randint(0, 3, (4, 8))
    with pytest.raises(ValueError, match=r"calib_data item 0 \(a Tensor \(4, 8\) int64\)"):
        eq.quantize(relu_mlp(8, 12, 12, 4), "w8a8", [batch])


@pytest.mark.parametrize(
    "recipe",
    [Recipe.preset("w8a8"), Recipe.preset("w8a8").replace(smooth_alpha=0.5), "w4a8"],
    ids=["calibration", "smoothquant", "gptq"],
)
def test_later_batch_of_the_wrong_shape_names_its_index(recipe: Recipe | str) -> None:
    with pytest.raises(ValueError, match=r"calib_data item 2 \(a Tensor \(3, 5\) float32\)"):
        eq.quantize(
            relu_mlp(8, 12, 12, 4), recipe, [randn_rows(), randn_rows(seed=1), randn_rows(3, 5)]
        )


def test_non_finite_batch_is_named_before_dynamic_smoothquant_reads_it() -> None:
    recipe = Recipe.preset("w8a8").replace(smooth_alpha=0.5)
    bad = randn_rows(seed=1)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration item 1 holds NaN or Inf"):
        eq.quantize(relu_mlp(8, 12, 12, 4), recipe, [randn_rows(), bad], method="dynamic")


@pytest.mark.parametrize(
    ("recipe", "kind"),
    [
        (Recipe.preset("w8a8").replace(skip=("fc9",)), "skip"),
        (Recipe.preset("w8a8").replace(overrides=(LayerOverride("fc9", skip=True),)), "override"),
    ],
)
def test_pattern_that_matches_no_layer_is_refused(recipe: Recipe, kind: str) -> None:
    model = relu_mlp(8, 12, 12, 4)
    with pytest.raises(ValueError) as info:
        eq.quantize(model, recipe, [randn_rows()])
    message = str(info.value)
    assert f"{kind} pattern 'fc9' matches no module" in message
    assert "module names: 0, 1, 2, 3, 4" in message and "Linear" in message
    # Names, globs and type names that exist are accepted.
    for pattern in ("2", "[24]", "ReLU"):
        eq.quantize(model, Recipe.preset("w8a8").replace(skip=(pattern,)), [randn_rows()])


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_weight_axis_that_is_not_a_dim_names_the_layer(granularity: str) -> None:
    spec = QuantSpec(
        bits=8, granularity=granularity, axis=3, group_size=4 if granularity == "group" else None
    )
    recipe = Recipe.preset("w8a8").replace(weight=spec)
    with pytest.raises(ValueError, match=r"layer '0'.*axis 3.*shape \(12, 8\); valid axes: 0\.\.1"):
        eq.quantize(relu_mlp(8, 12, 12, 4), recipe, [randn_rows()])


def test_method_that_is_not_a_string_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method \['static'\]; valid: static, dynamic"):
        eq.quantize(relu_mlp(8, 12, 12, 4), "w8a8", [randn_rows()], method=["static"])  # type: ignore[arg-type]


def test_num_samples_true_is_not_one_sample() -> None:
    with pytest.raises(ValueError, match="num_samples must be a positive int, got True"):
        eq.quantize(relu_mlp(8, 12, 12, 4), "w8a8", [randn_rows()], num_samples=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = relu_mlp(8, 12, 12, 4)
    path = tmp_path_factory.mktemp("load") / "q.pt"
    torch.save(eq.quantize(model, "w8a8", [randn_rows()]).state_dict(), path)
    return model, path


def test_load_of_a_file_that_is_not_a_state_dict_names_the_file(
    saved: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    model, _ = saved
    junk = tmp_path / "notes.pt"
    junk.write_text("not a torch file")
    with pytest.raises(ValueError, match=r"notes\.pt is not a saved state_dict"):
        eq.load(model, "w8a8", junk, randn_rows())
    pickled = tmp_path / "model.pt"
    with pickled.open("wb") as f:
        pickle.dump({"a": object()}, f)
    with pytest.raises(ValueError, match=r"model\.pt is not a saved state_dict.*objects other"):
        eq.load(model, "w8a8", pickled, randn_rows())


def test_load_of_a_folder_says_it_is_a_folder(saved: tuple[nn.Module, Path]) -> None:
    model, path = saved
    with pytest.raises(IsADirectoryError, match=f"{path.parent} is a folder"):
        eq.load(model, "w8a8", path.parent, randn_rows())


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
        eq.load(model, "w8a8", path, randn_rows(2, 7))


def test_load_of_a_smoothing_buffer_for_a_missing_layer_names_the_key(
    saved: tuple[nn.Module, Path],
) -> None:
    model, path = saved
    state = torch.load(path, weights_only=True)
    state["9.input_smooth_inv"] = torch.ones(8)
    with pytest.raises(ValueError, match=r"holds '9\.input_smooth_inv'.*no layer '9'"):
        eq.load(model, "w8a8", state, randn_rows())


@pytest.mark.parametrize(("saved_with", "asked"), [("static", "dynamic"), ("dynamic", "static")])
def test_load_with_the_other_of_static_and_dynamic_is_refused(saved_with: str, asked: str) -> None:
    model = relu_mlp(8, 12, 12, 4)
    state = eq.quantize(model, "w8a8", [randn_rows()], method=saved_with).state_dict()
    with pytest.raises(ValueError, match=f"quantized with method '{saved_with}'.*method='{asked}'"):
        eq.load(model, "w8a8", state, randn_rows(), method=asked)
    eq.load(model, "w8a8", state, randn_rows(), method=saved_with)


def test_an_activation_axis_out_of_range_names_the_quantizer_and_its_spec() -> None:
    # Before: "axis 5 out of range for a tensor of shape (16, 8)" from functional.py, no layer.
    spec = QuantSpec(bits=8, symmetric=False, granularity="channel", axis=5)
    recipe = Recipe.preset("w8a8").replace(activation=spec)
    with pytest.raises(
        ValueError,
        match=r"'0.input' \(activation quantizer, .*per-channel\(5\).*\): axis 5 out of range "
        r"for a tensor of shape \(16, 8\)",
    ):
        eq.quantize(relu_mlp(8, 12, 12, 4), recipe, [randn_rows()])


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch_F.relu(self.bn(self.conv(x)))
        x = torch_F.relu(x + self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return (
        Block().eval(),
        [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)],
        torch.randn(16, 3, 8, 8, generator=g),
    )


@pytest.mark.parametrize(
    ("preset", "method"),
    [
        ("w8a8", "static"),
        ("w4a4", "static"),
        ("w4-weight-only", "weight_only"),
        ("w8a8", "dynamic"),
    ],
)
def test_saved_and_loaded_model_computes_the_same(tmp_path: Path, preset: str, method: str) -> None:
    model, calib, test = _data()
    recipe = eq.Recipe.preset(preset)
    if method == "dynamic":
        recipe = recipe.replace(smooth_alpha=0.5)  # a buffer that exists only after smoothing
    qmodel = eq.quantize(model, recipe, calib, method=method)
    path = tmp_path / "q.pt"
    torch.save(qmodel.state_dict(), path)
    loaded = eq.load(model, recipe, path, calib[0], method=method)
    with torch.no_grad():
        assert torch.equal(qmodel(test), loaded(test))


def test_load_refuses_a_state_from_another_recipe(tmp_path: Path) -> None:
    model, calib, _ = _data()
    state = eq.quantize(model, "w8a8", calib, method="dynamic").state_dict()
    with pytest.raises(ValueError, match="does not fit"):
        eq.load(model, "w8a8", state, calib[0], method="static")
    with pytest.raises(FileNotFoundError, match="no saved state"):
        eq.load(model, "w8a8", tmp_path / "missing.pt", calib[0])
    with pytest.raises(ValueError, match="unknown method"):
        eq.load(model, "w8a8", state, calib[0], method="qat")
