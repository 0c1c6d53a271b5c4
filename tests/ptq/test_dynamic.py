"""Dynamic PTQ per token (the default) and per tensor: the simulation, the exported graph run in
ONNX Runtime, the recipe switch, and saving and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toys import MLP, gen, run_ort  # tests/toys.py

import edgequant as eq
from edgequant import functional as F
from edgequant.export.inspect import inspect_onnx
from edgequant.functional import sqnr_db
from edgequant.quantizer import quantizers
from edgequant.spec import LayerOverride, activation_spec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def token_mlp() -> MLP:
    """Linear layers over (batch, tokens, features), as in a transformer's feed-forward block."""
    return MLP(32, 64, 16)


def outlier_tokens(batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Tokens whose first one is 40x larger than the rest (as a transformer's first token often is)."""
    x = torch.randn(batch, 12, 32, generator=gen(seed))
    x[:, 0] *= 40.0
    return x


def test_per_token_parameters_are_each_rows_own() -> None:
    x = outlier_tokens(1)[0]
    scale, zero_point = F.dynamic_qparams(x, per_token=True)
    assert scale.shape == zero_point.shape == (12, 1)
    for row in range(12):
        s, z = F.dynamic_qparams(x[row])
        assert torch.equal(scale[row, 0], s) and torch.equal(zero_point[row, 0], z)
    # The outlier token no longer coarsens the others' grid.
    others = x[1:]
    assert (
        sqnr_db(others, F.dynamic_fake_quantize(x, per_token=True)[1:])
        > sqnr_db(others, F.dynamic_fake_quantize(x)[1:]) + 20
    )


def test_dynamic_default_is_per_token_and_exports_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = token_mlp().eval()
    qmodel = eq.quantize(model, "w8a8", method="dynamic")  # no data: per token by default
    acts = [q for q in quantizers(qmodel) if q.role == "activation"]
    assert acts and all(q.mode == "dynamic" and q.per_token for q in acts)
    assert any("each token" in step for step in qmodel.quant_info["pipeline"]["steps"])
    path = tmp_path / "token.onnx"
    info = eq.export_onnx(qmodel, path, outlier_tokens(2, seed=1), verify_data=[outlier_tokens()])
    assert info.verification.passed
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    # Each Linear is one fused ONNX Runtime kernel: product, per-row and per-column scales.
    assert "MatMulIntegerToFloat" in ops and not ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    held_out = outlier_tokens(8, seed=3)
    held_out[0, 3] = 0.0  # a row of zeros
    held_out[0, 4] = 0.0
    held_out[0, 4, 5] = -1e-44  # a row whose range underflows the scale
    with torch.no_grad():
        sim = qmodel(held_out)
    assert torch.isfinite(sim).all()
    assert torch.equal(run_ort(path, held_out), sim)  # the runtime computes the simulation's bits
    layers = inspect_onnx(path).layers
    assert [(layer.op, layer.activation) for layer in layers] == [
        ("MatMulIntegerToFloat", "dynamic")
    ] * 2
    assert all(layer.weight_source == "integer" for layer in layers)


def test_per_token_is_closer_to_float_than_per_tensor_on_outlier_tokens() -> None:
    torch.manual_seed(0)
    model = token_mlp().eval()
    token = eq.quantize(model, "w8a8", method="dynamic")
    tensor = eq.quantize(
        model, eq.Recipe.preset("w8a8").replace(dynamic_activation="tensor"), method="dynamic"
    )
    assert not any(q.per_token for q in quantizers(tensor))
    x = outlier_tokens(8, seed=4)
    with torch.no_grad():
        ref, a, b = model(x), token(x), tensor(x)
    assert sqnr_db(ref, a) > sqnr_db(ref, b) + 6


def test_per_tensor_recipe_exports_dynamic_quantize_linear(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recipe = eq.Recipe.preset("w8a8").replace(dynamic_activation="tensor")
    qmodel = eq.quantize(token_mlp().eval(), recipe, method="dynamic")
    path = tmp_path / "tensor.onnx"
    eq.export_onnx(qmodel, path, outlier_tokens(2), verify_data=[outlier_tokens(4, seed=2)])
    assert "DynamicQuantizeLinear" in {n.op_type for n in onnx.load(str(path)).graph.node}


def test_unknown_dynamic_activation_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"dynamic_activation='row'.*token, tensor"):
        eq.Recipe(dynamic_activation="row")
    recipe = eq.Recipe(dynamic_activation="tensor")
    assert eq.Recipe.from_dict(recipe.to_dict()) == recipe


def test_saved_and_loaded_model_keeps_per_token(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = token_mlp().eval()
    qmodel = eq.quantize(model, "w8a8", method="dynamic")
    torch.save(qmodel.state_dict(), tmp_path / "q.pt")
    loaded = eq.load(model, "w8a8", tmp_path / "q.pt", outlier_tokens(1), method="dynamic")
    assert all(q.per_token for q in quantizers(loaded) if q.role == "activation")
    x = outlier_tokens(2, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_a_per_tensor_model_loads_only_with_a_per_tensor_recipe(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = token_mlp().eval()
    recipe = eq.Recipe.preset("w8a8").replace(dynamic_activation="tensor")
    qmodel = eq.quantize(model, recipe, method="dynamic")
    torch.save(qmodel.state_dict(), tmp_path / "q.pt")
    loaded = eq.load(model, recipe, tmp_path / "q.pt", outlier_tokens(1), method="dynamic")
    assert not any(q.per_token for q in quantizers(loaded))
    with pytest.raises(ValueError, match=r"per tensor at run time.*dynamic_activation='tensor'"):
        eq.load(model, "w8a8", tmp_path / "q.pt", outlier_tokens(1), method="dynamic")


def test_an_override_below_8_activation_bits_is_refused_for_dynamic() -> None:
    recipe = eq.Recipe.preset("w8a8").replace(
        overrides=(LayerOverride("fc2", activation=activation_spec(4)),)
    )
    with pytest.raises(ValueError, match=r"override 'fc2' asks for 4-bit activations"):
        eq.quantize(token_mlp().eval(), recipe, method="dynamic")


def test_the_summary_and_the_recipe_say_per_token() -> None:
    qmodel = eq.quantize(token_mlp().eval(), "w8a8", method="dynamic")
    assert any("for each token" in note for note in qmodel.quant_summary.notes)
    assert "dynamic PTQ activations: per token" in str(eq.Recipe.preset("w8a8"))
