"""Recipe.reduce_range (ptq/reduce_range.py): 7-bit GPTQ weights on the 8-bit layers that read
uint8 activations, kept where the layer's output error does not grow, so that ONNX Runtime runs
them with its fast u8s8 kernel exactly; models in two styles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toys import SmallCNN, bert_batches, random_bert, tensor_batches  # tests/toys.py
from zoo import FunctionalMLP, ModuleCNN  # tests/zoo.py

import edgequant as eq
from edgequant.export.inspect import inspect_onnx
from edgequant.modules import QuantMixin
from edgequant.ptq import reduce_range as RR


def _layers(q: torch.nn.Module) -> dict[str, QuantMixin]:
    return {n: m for n, m in q.named_modules() if isinstance(m, QuantMixin)}


def _quantize(model: torch.nn.Module, shape: tuple[int, ...], **changes: object) -> torch.nn.Module:
    recipe = eq.Recipe.preset("w8a8").replace(**changes)
    return eq.quantize(model.eval(), recipe, calib_data=tensor_batches(shape, 8, seed=3))


CASES = [(ModuleCNN, (16, 3, 8, 8)), (FunctionalMLP, (16, 3, 4, 4))]


@pytest.mark.parametrize(("make", "shape"), CASES, ids=["module-cnn", "functional-mlp"])
def test_kept_layers_are_7_bit_and_export_int8_exactly(
    make: type[torch.nn.Module], shape: tuple[int, ...], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    q = _quantize(make(), shape)
    entry = q.quant_info["pipeline"]["reduce_range"]
    ratios = entry["output_error_ratio_7_to_8"]
    assert ratios, "every layer of these models reads uint8 inputs: each must be compared"
    kept = set(entry["layers"])
    for name, ratio in ratios.items():
        assert (name in kept) == (ratio <= 1 + RR.TOLERANCE), name
    layers = _layers(q)
    for name in ratios:
        wq = layers[name].weight_quantizer
        assert wq is not None
        assert wq.spec.bits == (7 if name in kept else 8)
    path = tmp_path / "m.onnx"
    x = tensor_batches(shape, 2, seed=9)
    # weight_storage="exact": the layers left at 8 bits are stored as UINT8 + 128 (the
    # default, "auto", keeps them INT8 on a CPU with VNNI: test_onnx.py).
    info = eq.export_onnx(q, path, x[0][:2], verify_data=x, weight_storage="exact")
    assert info.verification is not None and info.verification.passed
    kernels = [layer.kernel for layer in inspect_onnx(path).layers if layer.kernel]
    assert len(kernels) == len(ratios)
    exact_fast = sum(k.startswith("u8s8 (exact") for k in kernels)
    assert exact_fast == len(kept)
    assert sum(k.startswith("u8u8") for k in kernels) == len(ratios) - len(kept)


def test_forced_on_every_layer_and_off() -> None:
    torch.manual_seed(0)
    model, shape = ModuleCNN(), (16, 3, 8, 8)
    on = _quantize(model, shape, reduce_range=True)
    entry = on.quant_info["pipeline"]["reduce_range"]
    assert sorted(entry["layers"]) == sorted(entry["output_error_ratio_7_to_8"])
    for name in entry["layers"]:
        layer = _layers(on)[name]
        wq = layer.weight_quantizer
        assert wq is not None and wq.spec.bits == 7
        codes = torch.round(
            layer.weight.detach() / wq.scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
        )
        assert int(codes.abs().max()) <= 64
    off = _quantize(model, shape, reduce_range=False)
    assert off.quant_info["pipeline"]["reduce_range"] == {"layers": [], "why": "off in the recipe"}
    assert all(
        m.weight_quantizer.spec.bits == 8
        for m in _layers(off).values()
        if m.weight_quantizer is not None
    )


def test_signed_activations_have_no_candidates() -> None:
    torch.manual_seed(0)
    recipe = eq.Recipe.preset("w8a8").for_target("tflite-int8")
    q = eq.quantize(SmallCNN().eval(), recipe, calib_data=tensor_batches((8, 3, 8, 8), 4, seed=1))
    entry = q.quant_info["pipeline"]["reduce_range"]
    assert entry == {"layers": [], "why": "no 8-bit layer reads uint8 inputs"}


def test_other_learned_rounding_keeps_8_bits_and_says_why() -> None:
    torch.manual_seed(0)
    q = _quantize(ModuleCNN(), (16, 3, 8, 8), rounding="adaround")
    entry = q.quant_info["pipeline"]["reduce_range"]
    assert entry["layers"] == [] and "adaround" in entry["why"]
    assert any("reduce_range: not compared with adaround" in n for n in q.quant_summary.notes)


def test_output_error_from_grams_is_the_squared_error_of_the_layer() -> None:
    torch.manual_seed(0)
    w, q = torch.randn(3, 6), torch.randn(3, 6)
    xq, xf = torch.randn(12, 6), torch.randn(12, 6)
    g = RR.Grams(6)
    held = g.held_out(12)  # samples 3, 7, 11
    g.add_float(xf[held].unsqueeze(1))
    g.add_quantized(xq.unsqueeze(1), held)
    expected = float(
        ((xq[held].double() @ q.double().T - xf[held].double() @ w.double().T) ** 2).sum()
    )
    assert RR.output_error(w, q, g) == pytest.approx(expected, rel=1e-9)
    assert g.n_fit == 9 and g.n_score == 3 and g.seen == 12
    fit = xq[~held].double()
    assert torch.allclose(g.fit_hessian(), fit.T @ fit * (2.0 / 9))


def test_every_fourth_sample_is_held_out_whatever_the_batching() -> None:
    for size in (1, 3, 10):
        g, held = RR.Grams(1), []
        for start in range(0, 10, size):
            n = min(size, 10 - start)
            held += g.held_out(n).tolist()
            g.seen += n
        assert [i for i, h in enumerate(held) if h] == [3, 7]


def test_reloaded_model_computes_the_same() -> None:
    torch.manual_seed(0)
    model, shape = ModuleCNN().eval(), (16, 3, 8, 8)
    q = _quantize(model, shape, reduce_range=True)
    x = tensor_batches(shape, 1, seed=5)[0]
    back = eq.load(model, eq.Recipe.preset("w8a8"), q.state_dict(), x)
    with torch.no_grad():
        assert torch.equal(q(x), back(x))


def test_recipe_switch_is_validated_and_round_trips() -> None:
    with pytest.raises(ValueError, match="reduce_range"):
        eq.Recipe(reduce_range="yes")  # type: ignore[arg-type]
    recipe = eq.Recipe.preset("w8a8").replace(reduce_range=False)
    assert eq.Recipe.from_dict(recipe.to_dict()).reduce_range is False


def test_transformer_with_quantized_attention_is_judged_layer_by_layer() -> None:
    """Attention routes the matmuls run inside it to its quantized matmuls: the statistics of the
    Linear layers inside it must not go through them (they did, and GPTQ's Hessian was not
    positive definite)."""
    torch.manual_seed(0)
    data = bert_batches([12, 16, 9, 14, 12, 10, 16, 8])
    recipe = eq.Recipe.preset("w8a8").replace(reduce_range=True)
    q = eq.quantize(random_bert(), recipe, calib_data=data, method="static")
    ratios = q.quant_info["pipeline"]["reduce_range"]["output_error_ratio_7_to_8"]
    assert ratios and all(r is not None and 0.5 < r < 4.0 for r in ratios.values()), ratios
    # Where the pipeline rounds 8-bit weights with GPTQ (as outlier inputs make it do on a
    # trained transformer), the rule keeps 8 bits.
    gptq = eq.Recipe.preset("w8a8").replace(rounding="gptq")
    auto = eq.quantize(random_bert(), gptq, calib_data=data, method="static")
    entry = auto.quant_info["pipeline"]["reduce_range"]
    assert entry["layers"] == [] and "gptq rounding" in entry["why"]
