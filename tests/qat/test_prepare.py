"""prepare_qat: a PTQ start, trainable quantizers of each kind, their gradients, finalize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.qat import finalize, freeze_observers, prepare_qat
from edgequant.qat.base import QATQuantizer
from edgequant.qat.ema import EMAQuantizer
from edgequant.qat.lsq import LSQQuantizer, lsq_grad_scale
from edgequant.qat.pact import PACTQuantizer
from edgequant.quantizer import TensorQuantizer, quantizers

KINDS = {"lsq": LSQQuantizer, "lsq+": LSQQuantizer, "pact": PACTQuantizer, "ema": EMAQuantizer}


def _plain_ptq(recipe: eq.Recipe) -> eq.Recipe:
    # The static path alone (no GPTQ/AdaRound, CLE or bias correction): what prepare_qat starts from.
    return recipe.replace(rounding="nearest", equalize=False, bias_correction=False)


@pytest.mark.parametrize("range_learning", sorted(KINDS))
@pytest.mark.parametrize("preset", ["w8a8", "w4a4"])
def test_prepared_model_in_eval_is_the_ptq_model(tiny_model, calib, range_learning, preset):
    recipe = _plain_ptq(eq.Recipe.preset(preset).replace(range_learning=range_learning))
    ptq = eq.quantize(tiny_model, recipe, calib).eval()
    qat = prepare_qat(tiny_model, recipe, calib)
    assert qat.training
    found = [q for q in quantizers(qat) if isinstance(q, QATQuantizer)]
    assert found and all(q.mode == "quantize" for q in quantizers(qat))
    assert len(found) == len(list(quantizers(ptq)))
    # PACT has no weight form: its weights (and only those) follow their min/max.
    kinds = {type(q) for q in found if q.role == "activation"}
    assert kinds == {KINDS[range_learning]}
    qat.eval()
    x = calib[0]
    assert torch.equal(qat(x), ptq(x))


@pytest.mark.parametrize("range_learning", ["lsq", "lsq+", "ema"])
def test_start_from_a_learned_ptq_model_computes_what_it_computes(
    tiny_model, calib, range_learning
):
    """GPTQ at 2 bits moves the weight grids (clipping search) and rounds onto them: the QAT
    model started from it must take those grids, or its weights are re-quantized off them."""
    from edgequant.qat.prepare import start_from

    recipe = eq.Recipe.preset("w2a8").replace(
        rounding="gptq", range_learning=range_learning, first_last_bits=None
    )
    ptq = eq.quantize(tiny_model, recipe, calib).eval()
    plain = eq.quantize(tiny_model, _plain_ptq(recipe), calib)
    moved = [
        q.name
        for q, p in zip(quantizers(ptq), quantizers(plain), strict=True)
        if q.role == "weight" and not torch.equal(q.scale, p.scale)
    ]
    assert moved, "the clipping search moved no grid: this test would not test start_from"
    qat = prepare_qat(tiny_model, recipe, calib)
    start_from(qat, ptq)
    qat.eval()
    x = calib[0]
    assert torch.equal(qat(x), ptq(x))
    if range_learning != "ema":  # LSQ trains from the PTQ grid, not the calibrated one
        qat.train()
        out = qat(x)
        # The grid of each training forward (stored in the scale buffer) is the PTQ model's.
        grids = {q.name: q.scale for q in quantizers(ptq) if q.role == "weight"}
        for q in quantizers(qat):
            if q.role == "weight":
                assert torch.allclose(q.scale, grids[q.name], rtol=1e-6, atol=0), q.name
        # Same outputs, but for the odd exact tie that the training kernel (LSQ's learnable
        # fake-quantize) rounds the other way: one step of one activation, a few outputs.
        close = ((out - ptq(x)).abs() <= 1e-5).float().mean()
        assert close >= 0.95, float(close)


def test_shared_quantizers_stay_shared(tiny_model, calib):
    qat = prepare_qat(tiny_model, "w8a8", calib)
    ids = [id(q) for q in qat.modules() if isinstance(q, TensorQuantizer)]
    plain = [q for q in qat.modules() if type(q) is TensorQuantizer]
    assert not plain
    # A tensor read by two layers is quantized once: conv2's input quantizer is also a graph node.
    layer = qat.get_submodule("conv2")
    assert layer.shared_input and isinstance(layer.input_quantizer, QATQuantizer)
    assert len(ids) == len(set(ids))  # modules() dedups: each quantizer once


def test_lsq_gradient_is_esser_et_al(tiny_model, calib):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    q = qat.get_submodule("conv2").weight_quantizer
    assert isinstance(q, LSQQuantizer)
    w = qat.get_submodule("conv2").weight.detach().clone().requires_grad_(True)
    out = q(w)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    s = q.learned_scale.detach().reshape(-1, 1, 1, 1)
    v = w.detach() / s
    qmin, qmax = q.spec.qmin, q.spec.qmax
    # Clipped where round(v) leaves the grid, as PyTorch's learnable fake-quantize decides it
    # (with MSE ranges some weights sit in (qmax, qmax + 0.5), where v > qmax but round(v) = qmax).
    r = torch.round(v)
    d_scale = torch.where(r < qmin, float(qmin), torch.where(r > qmax, float(qmax), r - v))
    g = 1.0 / math.sqrt(w[0].numel() * qmax)
    assert g == pytest.approx(lsq_grad_scale(w, "weight", 0, None, qmax))
    expected = (upstream * d_scale).sum(dim=(1, 2, 3)) * g
    torch.testing.assert_close(q.learned_scale.grad, expected, rtol=1e-4, atol=1e-6)
    # Straight-through estimator: gradient 1 inside the grid, 0 where clipped.
    inside = (torch.round(v) >= qmin) & (torch.round(v) <= qmax)
    torch.testing.assert_close(w.grad, upstream * inside)


def test_pact_gradient_counts_clipped_values(tiny_model, calib):
    qat = prepare_qat(
        tiny_model,
        eq.Recipe.preset("w4a4").replace(range_learning="pact"),
        calib,
        start="calibrated",
    )
    q = next(
        q for q in quantizers(qat) if isinstance(q, PACTQuantizer) and q.zero_point.item() == 0
    )
    alpha = float(q.alpha.detach())
    x = torch.linspace(-0.5 * alpha, 2 * alpha, 101, requires_grad=True)
    q(x).sum().backward()
    high = x.detach() / q.scale > q.spec.qmax + 0.5
    assert int(high.sum()) > 0
    assert float(q.alpha.grad) == pytest.approx(int(high.sum()), rel=1e-5)
    # Straight-through inside the grid, nothing where clipped.
    assert x.grad is not None
    low = x.detach() / q.scale < q.spec.qmin - 0.5
    assert torch.equal(x.grad, (~high & ~low).float())


def test_scales_stay_positive(tiny_model, calib):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    q = qat.get_submodule("conv2").weight_quantizer
    with torch.no_grad():
        q.learned_scale.fill_(-1.0)
    w = qat.get_submodule("conv2").weight
    out = q(w)
    assert bool((q.scale == 1.0).all()) and torch.isfinite(out).all()
    with torch.no_grad():
        q.learned_scale.fill_(0.0)
    assert bool((q.scale > 0).all()) and torch.isfinite(q(w)).all()


def test_ema_ranges_follow_the_data_until_frozen(tiny_model, calib):
    qat = prepare_qat(tiny_model, eq.Recipe.preset("w8a8").replace(range_learning="ema"), calib)
    q = qat.get_submodule("conv1").input_quantizer
    assert isinstance(q, EMAQuantizer)
    before = q.scale.clone()
    qat(calib[0] * 4)  # a wider range
    after = q.scale.clone()
    assert float(after) > float(before)
    assert freeze_observers(qat) > 0
    qat(calib[0] * 16)
    assert torch.equal(q.scale, after)


def test_pow2_scales_from_the_first_step_and_export_unchanged(
    tiny_model, calib, train_data, tmp_path, sgd_steps
):
    """Issue 6: QAT under the dsp-pow2 target trains on power-of-two grids and exports them,
    through ResNet-20's option-A join (strided slice, zero padding, add) on signed INT8 grids."""
    recipe = eq.Recipe.preset("w8a8").for_target("dsp-pow2")
    assert tiny_model.slice_join
    qat = prepare_qat(tiny_model, recipe, calib, start="calibrated")

    def grids_are_powers_of_two() -> None:
        for q in quantizers(qat):  # the grid every training step used
            assert torch.equal(torch.exp2(torch.round(torch.log2(q.scale))), q.scale), q.name

    sgd_steps(qat, train_data, after_step=grids_are_powers_of_two)
    moved = [
        q
        for q in quantizers(qat)
        if isinstance(q, LSQQuantizer) and not torch.equal(q.learned_scale.detach(), q.scale)
    ]
    assert moved  # the learned (float) step sizes trained; their grids stayed powers of two
    qat.eval()
    for q in quantizers(qat):
        assert torch.equal(torch.exp2(torch.round(torch.log2(q.scale))), q.scale), q.name
    info = eq.export_onnx(qat, tmp_path / "pow2.onnx", calib[0][:2], verify_data=calib)
    assert info.verification.passed
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(tmp_path / "pow2.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    scale_names = {
        n.input[1] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    }
    scales = [v for name in scale_names if name in inits for v in inits[name].reshape(-1).tolist()]
    assert len(scales) >= 5
    assert all(math.log2(v) == round(math.log2(v)) for v in scales)
    # The join stays on the signed grid: the slices and the pad each feed a QuantizeLinear with
    # an INT8 zero point (ONNX Runtime runs them on integers and propagates nothing itself).
    readers = {i: n for n in graph.node for i in n.input}
    moves = [n for n in graph.node if n.op_type in ("Slice", "Pad")]
    assert {n.op_type for n in moves} == {"Slice", "Pad"}
    for node in moves:
        reader = readers[node.output[0]]
        assert reader.op_type == "QuantizeLinear", node.name
        assert inits[reader.input[2]].dtype == np.int8, node.name


def test_finalize_gives_plain_quantizers_computing_the_same(tiny_model, calib, train_data):
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    for x, y in train_data:
        opt.zero_grad()
        nn.functional.cross_entropy(qat(x), y).backward()
        opt.step()
    final = finalize(qat)
    assert qat.training  # not modified
    assert all(type(q) is TensorQuantizer for q in quantizers(final))
    qat.eval()
    assert torch.equal(final(calib[0]), qat(calib[0]))
    with pytest.raises(ValueError, match="no QAT quantizers"):
        finalize(final)


def test_bad_arguments_are_named(tiny_model, calib):
    with pytest.raises(TypeError, match="model must be"):
        prepare_qat("resnet", "w8a8", calib)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="recipe must be"):
        prepare_qat(tiny_model, 8, calib)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples"):
        prepare_qat(tiny_model, "w8a8", calib, num_samples=0)
    with pytest.raises(ValueError, match="calib_data is required"):
        prepare_qat(tiny_model, "w8a8", None)
    with pytest.raises(ValueError, match="range_learning"):
        eq.Recipe.preset("w8a8").replace(range_learning="adam")
    with pytest.raises(ValueError, match="quantizes no activations"):
        prepare_qat(tiny_model, "w8-weight-only", calib)


@pytest.mark.parametrize("extra", [{"smooth_alpha": 0.5}, {"split_outliers": 0.5}])
def test_start_from_refuses_a_smoothed_or_split_ptq_model(tiny_model, calib, extra):
    """SmoothQuant and outlier splitting change a layer's weights (and width) for an input
    transform the QAT model does not have: copying those weights would silently compute
    something else, so start_from refuses, and prepare_qat says it skipped those steps."""
    from edgequant.qat.prepare import start_from

    recipe = eq.Recipe.preset("w8a8").replace(**extra)
    ptq = eq.quantize(tiny_model, recipe, calib)
    qat = prepare_qat(tiny_model, recipe, calib)
    assert any("prepare_qat does not run" in n for n in qat.quant_summary.notes)
    with pytest.raises(ValueError, match="smoothed or has split input channels"):
        start_from(qat, ptq)


def test_the_default_start_is_the_ptq_pipelines_model(tiny_model, calib):
    """prepare_qat starts where eq.quantize ends for the same recipe, learned rounding and bias
    correction included; start="calibrated" rounds to nearest from calibrated ranges."""
    ptq = eq.quantize(tiny_model, "w4a8", calib).eval()
    qat = prepare_qat(tiny_model, "w4a8", calib)
    assert qat.quant_info["start"] == "ptq"
    assert "gptq weight rounding" in qat.quant_info["pipeline"]["steps"]
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(qat.eval()(x), ptq(x))
        plain = prepare_qat(tiny_model, "w4a8", calib, start="calibrated").eval()
        assert not torch.equal(plain(x), ptq(x))
    assert "pipeline" not in plain.quant_info
    with pytest.raises(ValueError, match="unknown start 'best'; valid: ptq, calibrated"):
        prepare_qat(tiny_model, "w4a8", calib, start="best")


@pytest.mark.parametrize("made_by", ["eq.quantize", "eq.prepare_qat"])
def test_prepare_qat_refuses_a_quantized_model(tiny_model, calib, made_by: str) -> None:
    # Before: "the model has no quantizable layer ... (conv1.weight_quantizer: no quantized
    # version of this layer type; ...)".
    if made_by == "eq.quantize":
        quantized = eq.quantize(tiny_model, "w8a8", calib)
    else:
        quantized = prepare_qat(tiny_model, "w8a8", calib)
    with pytest.raises(ValueError, match=f"model is already quantized by {made_by} .*FP32 model"):
        prepare_qat(quantized, "w8a8", calib)


def test_prepare_qat_refuses_a_pattern_that_matches_no_layer(tiny_model, calib) -> None:
    # Before: eq.quantize refused it, prepare_qat trained with the typo'd layer at the defaults.
    recipe = eq.Recipe.preset("w4a4").replace(skip=("conv9",))
    with pytest.raises(ValueError, match="skip pattern 'conv9' matches no module of the model"):
        prepare_qat(tiny_model, recipe, calib)
