"""Weight-only PTQ (ptq/weight_only.py): activation quantizers dropped from any recipe, and the
rule that runs the decoder pipeline only on a decoder stack below 8 bits. The methods side by side
on the toy models are in test_quantize.py."""

from __future__ import annotations

import pytest
import torch
from toys import SmallCNN, lm_recipe, tensor_batches, tiny_llama, token_batches  # tests/toys.py

import edgequant as eq
from edgequant.instrument import quant_layers
from edgequant.modules import QuantLinear
from edgequant.spec import LayerOverride, QuantSpec, weight_spec


def test_weight_only_drops_activation_quantizers_from_any_recipe() -> None:
    torch.manual_seed(0)
    model, calib = SmallCNN().eval(), tensor_batches((4, 3, 8, 8), 4, seed=10)
    qmodel = eq.quantize(model, "w4a4", calib, method="weight_only")
    assert all(m.input_quantizer is None for _, m in quant_layers(qmodel))
    assert qmodel.quant_info["recipe"]["activation"] is None


def test_the_rule_leaves_8_bit_and_non_decoder_models_alone() -> None:
    model = tiny_llama()
    q = eq.quantize(model, lm_recipe(8), calib_data=token_batches(), method="weight_only")
    assert "decoder" not in q.quant_info["pipeline"]
    with pytest.raises(ValueError, match="decoder pipeline"):
        eq.quantize(
            torch.nn.Sequential(torch.nn.Linear(8, 8)),
            lm_recipe(4, None, awq=True),
            calib_data=[torch.randn(2, 8)],
            method="weight_only",
        )


def test_block_int8_rule_is_on_for_a_4_bit_llama_for_onnxruntime_only() -> None:
    """Recipe.block_int8_inputs (None = auto): "all" for a LLaMA-style LM at <= 4 bits under the
    onnxruntime target, every quantized Linear with the block of its MatMulNBits form, or the
    lm_head only on request; off (with the reason) at 8 bits, under another target, for a group
    size MatMulNBits cannot take and for other models; on where it cannot apply is an error
    naming the layer."""
    model = tiny_llama()
    q = eq.quantize(model, lm_recipe(), method="weight_only")
    pipeline = q.quant_info["pipeline"]
    assert pipeline["block_int8_inputs"] == "all"
    inside = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(inside) == 2 * 7 + 1 and pipeline["block_int8_layers"][-1] == "lm_head"
    assert sorted(pipeline["block_int8_layers"]) == sorted(inside)
    assert q.lm_head.input_block_int8.item() == 64  # per row: the largest block dividing 64
    # The 4-bit layers: their group of 32 along the input.
    assert {m.input_block_int8.item() for n, m in inside.items() if n != "lm_head"} == {32}
    assert any("Linear int8 inputs" in step for step in pipeline["steps"])
    for scope in (True, "all"):
        p = eq.quantize(model, lm_recipe(block_int8_inputs=scope), method="weight_only")
        assert p.quant_info["pipeline"]["block_int8_layers"] == pipeline["block_int8_layers"]
    head = eq.quantize(model, lm_recipe(block_int8_inputs="lm_head"), method="weight_only")
    assert head.quant_info["pipeline"]["block_int8_layers"] == ["lm_head"]
    assert head.quant_info["pipeline"]["block_int8_inputs"] == "lm_head"
    rest = [m for n, m in head.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"]
    assert all(m.input_block_int8 is None for m in rest)
    off = {
        "8-bit": lm_recipe(8),
        "target": lm_recipe().for_target("tflite-int8"),
        "group 8": lm_recipe(
            4, None, overrides=(LayerOverride("lm_head", weight=weight_spec(8, 8)),)
        ),
        "recipe": lm_recipe(block_int8_inputs=False),
    }
    for label, recipe in off.items():
        p = eq.quantize(model, recipe, method="weight_only").quant_info["pipeline"]
        assert p["block_int8_inputs"] is False, label
        assert p["reasons"]["block_int8_inputs"], label
    assert (
        "MatMulNBits"
        in eq.quantize(model, off["group 8"], method="weight_only").quant_info["pipeline"][
            "reasons"
        ]["block_int8_inputs"]
    )
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    p = eq.quantize(mlp, lm_recipe(), method="weight_only").quant_info["pipeline"]
    assert p["block_int8_inputs"] is False
    for scope in (True, "lm_head"):
        with pytest.raises(ValueError, match=r"lm_head.*MatMulNBits"):
            bad = off["group 8"].replace(block_int8_inputs=scope)
            eq.quantize(model, bad, method="weight_only")
    with pytest.raises(ValueError, match="LLaMA-style"):
        eq.quantize(mlp, lm_recipe(block_int8_inputs=True), method="weight_only")


# Block Linears on grids MatMulNBits cannot take (functional.nbits_form): per tensor, 6 bits,
# per channel along the inputs.
NO_NBITS_FORM = {
    "model.layers.1.mlp.down_proj": QuantSpec(bits=4),
    "model.layers.1.self_attn.o_proj": weight_spec(6),
    "model.layers.1.mlp.up_proj": weight_spec(4).replace(axis=1),
}


def no_nbits_form_recipe(**kw: object) -> eq.Recipe:
    """lm_recipe with the NO_NBITS_FORM Linears."""
    rules = tuple(LayerOverride(n, weight=s) for n, s in NO_NBITS_FORM.items())
    return lm_recipe(overrides=rules, **kw)


def test_block_int8_rule_leaves_out_linears_without_a_matmulnbits_form() -> None:
    """Linears whose grid MatMulNBits cannot take (per tensor, 6 bits, per channel along the
    inputs: the export refuses them) get no int8 block inputs; the rest do. An lm_head on such
    a grid turns auto off with the reason, and is an error naming it when asked for."""
    q = eq.quantize(tiny_llama(), no_nbits_form_recipe(), method="weight_only")
    pipeline = q.quant_info["pipeline"]
    assert pipeline["block_int8_inputs"] == "all"
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert {n: layers[n].weight_quantizer.spec for n in NO_NBITS_FORM} == NO_NBITS_FORM
    assert sorted(pipeline["block_int8_layers"]) == sorted(set(layers) - set(NO_NBITS_FORM))
    assert all(layers[n].input_block_int8 is None for n in NO_NBITS_FORM)
    head_rules = {"per-tensor": QuantSpec(bits=8), "6-bit": weight_spec(6)}
    for reason, spec in head_rules.items():
        recipe = lm_recipe(overrides=(LayerOverride("lm_head", weight=spec),))
        recipe = recipe.replace(first_last_bits=None)  # keeps the lm_head's bits
        p = eq.quantize(tiny_llama(), recipe, method="weight_only").quant_info["pipeline"]
        assert p["block_int8_inputs"] is False and "block_int8_layers" not in p
        assert reason in p["reasons"]["block_int8_inputs"]
        for scope in (True, "all", "lm_head"):
            with pytest.raises(ValueError, match=rf"lm_head \(64 inputs, .*\) .*{reason}"):
                eq.quantize(
                    tiny_llama(), recipe.replace(block_int8_inputs=scope), method="weight_only"
                )


def test_block_int8_inputs_survive_save_and_load(tmp_path) -> None:
    model = tiny_llama()
    q = eq.quantize(model, lm_recipe(), calib_data=token_batches(), method="weight_only")
    torch.save(q.state_dict(), tmp_path / "q.pt")
    batch = token_batches(2)[0]
    loaded = eq.load(model, lm_recipe(), tmp_path / "q.pt", batch, method="weight_only")
    assert loaded.lm_head.input_block_int8.item() == 64
    assert loaded.model.layers[1].mlp.down_proj.input_block_int8.item() == 32
    with torch.no_grad():
        ids = batch["input_ids"]
        assert torch.equal(loaded(input_ids=ids).logits, q(input_ids=ids).logits)
