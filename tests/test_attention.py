"""attention.py and modules.QuantMatMul: the matmuls of two activations (Q·Kᵀ, P·V) quantized
by static PTQ however the model writes them (Hugging Face BERT's eager matmuls,
nn.TransformerEncoderLayer's and nn.MultiheadAttention's scaled_dot_product_attention, and
hand-written `@` / torch.matmul / F.scaled_dot_product_attention, traced by torch.fx or not);
the ONNX export runs them as integer matmuls in ONNX Runtime; recipe.quantize_attention=False
keeps them float."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn
from toys import bert_batches, gen, random_bert  # tests/toys.py
from zoo import ZOO, Attention  # tests/zoo.py

import edgequant as eq
from edgequant.attention import discover
from edgequant.export.inspect import inspect_onnx
from edgequant.functional import sqnr_db
from edgequant.modules import QuantMatMul, QuantScaledDotProductAttention
from edgequant.quantizer import calibration_mode
from edgequant.spec import activation_spec


class HandAttention(nn.Module):
    """Self-attention written by hand: projections, heads by view/transpose, the scores as
    `style` says ("at": q @ k.transpose, "matmul": torch.matmul, "sdpa": the fused function),
    a residual add and a head. `untraceable` adds a data-dependent branch torch.fx cannot trace."""

    def __init__(self, style: str, untraceable: bool = False) -> None:
        super().__init__()
        self.style, self.untraceable = style, untraceable
        self.embed = nn.Linear(8, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 3)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.untraceable and h.dim() == 3:  # fx cannot branch on a traced value; export can
            h = h * 0.5
        q, k, v = self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h))
        if self.style == "sdpa":
            a = torch_F.scaled_dot_product_attention(q, k, v)
        else:
            mm = torch.matmul if self.style == "matmul" else (lambda x, y: x @ y)
            p = torch.softmax(mm(q, k.transpose(-2, -1)) / math.sqrt(8), dim=-1)
            a = mm(p, v)
        a = a.transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)
        return self.head((h + self.o(a)).mean(1))


def _hand_batches() -> list[torch.Tensor]:
    g = gen(1)
    return [torch.randn(4, 5, 8, generator=g) for _ in range(2)]


def _attention_ops(qmodel: nn.Module) -> list[nn.Module]:
    return [m for m in qmodel.modules() if isinstance(m, QuantMatMul)]


def test_quant_matmul_is_fake_quant_of_both_operands_then_matmul() -> None:
    g = gen(0)
    a, b = torch.randn(2, 3, 5, 4, generator=g) * 3, torch.rand(2, 3, 4, 6, generator=g)
    mm = QuantMatMul(activation_spec(8), "mm")
    with calibration_mode(mm):
        mm(a, b)
    for q in (mm.input_quantizer, mm.other_quantizer):
        q.compute_qparams()
        q.set_mode("quantize")
    expected = []
    for x, q in ((a, mm.input_quantizer), (b, mm.other_quantizer)):
        scale, zp = float(q.scale), int(q.zero_point)
        expected.append(torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255))
    reference = torch.matmul(*expected)
    assert torch.equal(mm.train()(a, b), reference)  # the fake-quantized form (QAT)
    assert not torch.equal(reference, torch.matmul(a, b))  # the operands were rounded
    # Eval mode: the same integers summed exactly, as the runtime's integer matmul does, so it
    # differs from the float form only by float rounding.
    exact = torch.matmul(expected[0].double(), expected[1].double())
    torch.testing.assert_close(mm.eval()(a, b), exact.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mm(a, b), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mask_kind, causal, gqa", [(None, False, False), ("bool", False, False), ("float", True, True)]
)
def test_written_out_sdpa_equals_the_function(
    mask_kind: str | None, causal: bool, gqa: bool
) -> None:
    """With its quantizers off, the written-out attention is F.scaled_dot_product_attention."""
    g = gen(2)
    q = torch.randn(2, 4, 5, 8, generator=g)
    kv_heads = 2 if gqa else 4
    k, v = (torch.randn(2, kv_heads, 5, 8, generator=g) for _ in range(2))
    mask: Any = None
    if mask_kind == "bool":
        mask = torch.rand(5, 5, generator=g) > 0.3
        mask[:, 0] = True
    elif mask_kind == "float":
        mask = torch.randn(5, 5, generator=g)
    module = QuantScaledDotProductAttention(activation_spec(8), "sdpa")
    kw = dict(attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=0.3)
    if causal and mask is not None:
        kw["is_causal"] = False  # the function takes one or the other: causal as a float mask
        mask = mask + torch.full((5, 5), float("-inf")).triu(1)
        kw["attn_mask"] = mask
    expected = torch_F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(module(q, k, v, **kw), expected, rtol=1e-5, atol=1e-5)


def _bert_sdpa() -> tuple[nn.Module, list[Any]]:
    """The zoo's tiny BERT on Hugging Face's "sdpa" attention (F.scaled_dot_product_attention),
    the default where the model does not ask for "eager"."""
    import transformers

    encoder, batches = ZOO["tiny_bert"]()
    cfg = transformers.BertConfig(
        **{**encoder.bert.config.to_dict(), "attn_implementation": "sdpa"}
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    assert model.config._attn_implementation == "sdpa"
    return model, batches


_HAND = {
    "hand_at": ("at", False),
    "hand_matmul": ("matmul", False),
    "hand_sdpa": ("sdpa", False),
    "hand_untraceable": ("at", True),
}
_ZOO_CASES = ["transformer_encoder_layer", "multihead_attention"]
_ZOO_CASES += ["tiny_bert"] if "tiny_bert" in ZOO else []  # transformers installed
NAMES = sorted([*_HAND, *_ZOO_CASES, *(["bert_sdpa"] if "tiny_bert" in ZOO else [])])


def case(name: str) -> tuple[nn.Module, list[Any], int]:
    """(model, calibration batches, attention matmuls it runs), built when a test asks."""
    if name in _HAND:
        style, untraceable = _HAND[name]
        torch.manual_seed(0)
        return HandAttention(style, untraceable).eval(), _hand_batches(), 2
    if name == "bert_sdpa":
        return (*_bert_sdpa(), 2)
    model, data = ZOO[name]()
    return model, data, 2


@pytest.mark.parametrize("name", NAMES)
def test_static_quantize_leaves_no_float_attention_matmul(name: str) -> None:
    model, data, expected = case(name)
    assert len(discover(model, data[0])) >= 1  # the float model has matmuls of activations
    qmodel = eq.quantize(model, "w8a8", data, method="static")
    ops = _attention_ops(qmodel)
    assert len(ops) == expected
    assert all(
        q.mode == "quantize" and q.calibrated
        for m in ops
        for q in (m.input_quantizer, m.other_quantizer)
    )
    # Run again under the discovery mode: every matmul of two activations now happens inside a
    # quantized op (none left outside), and every quantized op runs.
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in ops]
    leftover = discover(qmodel, data[0])
    for h in hooks:
        h.remove()
    assert leftover == []
    assert len(calls) == expected
    notes = " ".join(qmodel.quant_summary.notes)
    assert "attention matmuls quantized" in notes and "softmax between them float" in notes


def test_traced_graph_gets_quantized_matmul_nodes() -> None:
    model, data, _ = case("hand_at")
    qmodel = eq.quantize(model, "w8a8", data, method="static")
    assert isinstance(qmodel, torch.fx.GraphModule)
    targets = [n.target for n in qmodel.graph.nodes if n.op == "call_module"]
    assert "quant_matmuls.0" in targets and "quant_matmuls.1" in targets


def test_switch_off_keeps_attention_float() -> None:
    model, data, _ = case("transformer_encoder_layer")
    recipe = eq.Recipe.preset("w8a8").replace(quantize_attention=False)
    qmodel = eq.quantize(model, recipe, data, method="static")
    assert _attention_ops(qmodel) == []
    assert len(discover(qmodel, data[0])) == 1  # the float scaled_dot_product_attention
    assert any("quantize_attention is off" in n for n in qmodel.quant_summary.notes)


def test_recipe_switch_is_validated_and_round_trips() -> None:
    with pytest.raises(TypeError, match="quantize_attention must be true or false"):
        eq.Recipe(quantize_attention="yes")  # type: ignore[arg-type]
    recipe = eq.Recipe.preset("w8a8").replace(quantize_attention=False)
    assert eq.Recipe.from_dict(recipe.to_dict()) == recipe


def _export_and_count(qmodel: nn.Module, data: list[Any], path: Path) -> dict[str, int]:
    from edgequant.export.inspect import runtime_activation_matmuls

    info = eq.export_onnx(qmodel, path, data[0], verify_data=data[1:])
    assert info.verification.passed
    return runtime_activation_matmuls(path)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("hand_sdpa", marks=pytest.mark.slow),
        pytest.param("hand_untraceable", marks=pytest.mark.slow),
        "multihead_attention",
    ],
)
def test_export_runs_attention_as_integer_matmuls(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, data, expected = case(name)
    qmodel = eq.quantize(model, "w8a8", data, method="static")
    counts = _export_and_count(qmodel, data, tmp_path / "m.onnx")
    assert counts.get("MatMul", 0) == 0 and counts.get("FusedMatMul", 0) == 0, counts
    assert sum(counts.values()) == expected, counts
    # inspect shows both operands of each as quantized
    report = inspect_onnx(tmp_path / "m.onnx")
    pairs = [layer for layer in report.layers if layer.other_activation is not None]
    assert len(pairs) == expected
    assert all(p.activation == "static" and p.other_activation == "static UINT8" for p in pairs)
    assert f"matmuls of two activations: {expected}, {expected} with both" in report.format()


@pytest.mark.slow
def test_export_with_switch_off_runs_float_matmuls(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, data, _ = case("hand_matmul")
    recipe = eq.Recipe.preset("w8a8").replace(quantize_attention=False)
    qmodel = eq.quantize(model, recipe, data, method="static")
    counts = _export_and_count(qmodel, data, tmp_path / "m.onnx")
    # P·V reads the softmax's float output; Q·Kᵀ may run integer even so (the graph quantizes
    # the projections' outputs, which ONNX Runtime fuses into the matmul).
    assert counts.get("MatMul", 0) + counts.get("FusedMatMul", 0) >= 1, counts


@pytest.mark.slow
def test_bert_attention_is_integer_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    model = random_bert()
    data = bert_batches([6, 8], batch=2)
    qmodel = eq.quantize(model, "w8a8", data, method="static")
    ops = _attention_ops(qmodel)
    assert len(ops) == 4  # two layers, Q·Kᵀ and P·V each
    assert discover(qmodel, data[0]) == []
    counts = _export_and_count(qmodel, data, tmp_path / "bert.onnx")
    assert counts.get("MatMul", 0) == 0 and counts.get("FusedMatMul", 0) == 0, counts
    assert sum(counts.values()) == 4, counts


@pytest.mark.parametrize("name", ["hand_at", "transformer_encoder_layer"])
def test_saved_state_loads_with_its_attention_grids(name: str) -> None:
    model, data, _ = case(name)
    qmodel = eq.quantize(model, "w8a8", data, method="static")
    state = qmodel.state_dict()
    assert any(".quant_matmuls." in k or k.startswith("quant_matmuls.") for k in state)
    loaded = eq.load(model, "w8a8", state, data[0])
    with torch.no_grad():
        assert torch.equal(loaded(data[1]), qmodel(data[1]))


class EinsumAttention(HandAttention):
    """Scores by torch.einsum, which has no quantized form here; P·V by `@`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        q, k, v = self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h))
        p = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), dim=-1)
        a = (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)
        return self.head((h + self.o(a)).mean(1))


def test_summary_lists_the_ops_of_two_activations_left_float() -> None:
    torch.manual_seed(0)
    model, data = EinsumAttention("at", untraceable=False).eval(), _hand_batches()
    qmodel = eq.quantize(model, "w8a8", data, method="static")
    assert len(_attention_ops(qmodel)) == 1  # P·V
    notes = qmodel.quant_summary.notes
    assert any("left in float" in n and "einsum (no quantized form)" in n for n in notes), notes
    assert [kind for _, kind, _ in discover(qmodel, data[0])] == ["float"]


def test_qat_trains_the_attention_grids() -> None:
    """prepare_qat builds the same attention quantizers as static PTQ, in their trainable form:
    a loss's gradient reaches their learned ranges."""
    model, data, expected = case("hand_untraceable")
    qmodel = eq.prepare_qat(model, eq.Recipe.preset("w8a8"), calib_data=data)
    ops = _attention_ops(qmodel)
    assert len(ops) == expected
    qmodel.train()
    qmodel(data[0]).square().mean().backward()
    for m in ops:
        for q in (m.input_quantizer, m.other_quantizer):
            grads = [p.grad for p in q.parameters()]
            assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads), m


def test_dynamic_quantization_lists_attention_as_float() -> None:
    model, data, _ = case("transformer_encoder_layer")
    qmodel = eq.quantize(model, "w8a8", data, method="dynamic")
    assert _attention_ops(qmodel) == []
    notes = [n for n in qmodel.quant_summary.notes if "left in float (dynamic" in n]
    assert notes and "layer.self_attn: scaled_dot_product_attention" in notes[0]


class WeightsAttention(Attention):
    """zoo.Attention's nn.MultiheadAttention asked for its attention weights with a float mask:
    PyTorch then computes the scores with torch.baddbmm and P·V with torch.bmm, not the fused
    function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        mask = torch.zeros(x.shape[1], x.shape[1]).triu(1) * -1e4
        a, weights = self.attn(h, h, h, attn_mask=mask, need_weights=True)
        return self.head((h + a).mean(1)) + weights.mean()


def test_baddbmm_and_bmm_attention_is_quantized() -> None:
    torch.manual_seed(0)
    model, data = WeightsAttention().eval(), _hand_batches()
    assert [op for _, _, op in discover(model, data[0])] == ["baddbmm", "bmm"]
    qmodel = eq.quantize(model, "w8a8", data, method="static")
    assert len(_attention_ops(qmodel)) == 2
    assert discover(qmodel, data[0]) == []
    with torch.no_grad():
        assert sqnr_db(model(data[1]), qmodel(data[1])) > 25
