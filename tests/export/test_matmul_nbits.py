"""MatMulNBits packing (export/matmul_nbits.py): a grid it cannot take is named with the reason
of the rule the weight-only PTQ applies (functional.nbits_form); the simulated int8 input rounding
is what ONNX Runtime computes at accuracy_level=4."""

from __future__ import annotations

import pytest
import torch
from toys import lm_recipe, tiny_llama  # tests/toys.py

import edgequant as eq
from edgequant.export.matmul_nbits import pack_linear


def test_export_names_a_group_size_matmulnbits_cannot_take() -> None:
    q = eq.quantize(tiny_llama(), lm_recipe(4, 8), method="weight_only")
    with pytest.raises(ValueError, match=r"q_proj.*power of two"):
        pack_linear(q.model.layers[0].self_attn.q_proj, "model.layers.0.self_attn.q_proj")


def test_export_refuses_what_the_ptq_left_without_int8_block_inputs(tmp_path) -> None:
    """A Linear on a grid with no MatMulNBits form (per tensor, 6 bits) gets no int8 block
    inputs from the weight-only PTQ, and the export refuses it with the same rule's reason
    (functional.nbits_form_missing), naming it: not for its input rounding."""
    from edgequant.export.lm import export_lm_onnx
    from edgequant.functional import nbits_form_missing
    from edgequant.spec import LayerOverride, QuantSpec, weight_spec

    bad = {
        "model.layers.1.self_attn.o_proj": QuantSpec(bits=4),
        "model.layers.1.mlp.down_proj": weight_spec(6),
    }
    rules = tuple(LayerOverride(n, weight=s) for n, s in bad.items())
    q = eq.quantize(tiny_llama(), lm_recipe(overrides=rules), method="weight_only")
    assert q.quant_info["pipeline"]["block_int8_inputs"] == "all"
    for name, spec in bad.items():
        layer = q.get_submodule(name)
        assert layer.input_block_int8 is None
        why = nbits_form_missing(spec, layer.in_features)
        assert why
        with pytest.raises(ValueError, match="no MatMulNBits form") as refused:
            pack_linear(layer, name)
        assert name in str(refused.value) and why in str(refused.value)
    with pytest.raises(ValueError, match=r"o_proj.*per-tensor") as refused:
        export_lm_onnx(q, tmp_path / "lm.onnx")
    assert "int8" not in str(refused.value) and not (tmp_path / "lm.onnx").exists()


def test_groups_along_axis_minus_1_pack_as_along_axis_1() -> None:
    """A group spec along axis -1 (the inputs, as axis 1) has the MatMulNBits form the PTQ gave
    int8 block inputs; the export packs it as the axis-1 one."""
    model = tiny_llama()
    q1 = eq.quantize(model, lm_recipe(), method="weight_only")
    recipe = lm_recipe().replace(weight=lm_recipe().weight.replace(axis=-1))
    q2 = eq.quantize(model, recipe, method="weight_only")
    name = "model.layers.1.mlp.down_proj"
    layer = q2.get_submodule(name)
    assert layer.weight_quantizer.spec.axis == -1 and layer.input_block_int8.item() == 32
    a, b = pack_linear(q1.get_submodule(name), name), pack_linear(layer, name)
    assert (a.block, a.bits, a.int8_inputs) == (b.block, b.bits, b.int8_inputs) == (32, 4, True)
    assert (a.data == b.data).all() and (a.scales == b.scales).all()
    assert a.zero_points is None and b.zero_points is None


def _nbits_node(k: int, n: int, bits: int, block: int, seed: int):
    """One MatMulNBits node at accuracy_level=4 on random symmetric codes; its float weight."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    blocks = k // block
    codes = rng.integers(0, 2**bits, size=(n, blocks, block), dtype=np.uint8)
    data = codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes
    scales = rng.uniform(0.001, 0.01, size=(n * blocks,)).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "w", "s"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=4,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, n])],
        [
            numpy_helper.from_array(data.astype(np.uint8), "w"),
            numpy_helper.from_array(scales, "s"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    centred = codes.astype(np.float32) - 2 ** (bits - 1)
    weight = torch.from_numpy(centred * scales.reshape(n, blocks, 1)).reshape(n, k)
    return model, weight


@pytest.mark.parametrize(
    ("k", "n", "bits", "block"),
    [(576, 96, 4, 64), (256, 64, 4, 128), (64, 48, 4, 16), (96, 64, 4, 32), (128, 200, 8, 64)],
)
def test_block_int8_simulation_is_what_accuracy_level_4_computes(k, n, bits, block) -> None:
    """ONNX Runtime's MatMulNBits at accuracy_level=4 equals the float matmul of the simulated
    input (functional.block_int8_fake_quantize) to float rounding, and differs from the float
    input's product by far more: the simulation captures its int8 rounding."""
    import numpy as np

    ort = pytest.importorskip("onnxruntime")
    from edgequant.functional import block_int8_fake_quantize

    model, weight = _nbits_node(k, n, bits, block, seed=k + n)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    # Channels of very different size (as LM activations have) and an all-zero block.
    x = rng.standard_normal((1, 3, k)) * np.exp(rng.standard_normal((1, 1, k)))
    x = x.astype(np.float32)
    x[0, 1, :block] = 0.0
    y = torch.from_numpy(session.run(None, {"x": x})[0]).double()
    xt = torch.from_numpy(x)
    simulated = block_int8_fake_quantize(xt, block).double() @ weight.double().t()
    plain = xt.double() @ weight.double().t()
    size = simulated.abs().max()
    assert (y - simulated).abs().max() / size < 1e-5
    assert (y - plain).abs().max() / size > 1e-3
