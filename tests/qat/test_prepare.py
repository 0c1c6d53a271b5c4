"""prepare_qat: a PTQ start, trainable quantizers of each kind, finalize. Each kind's gradient and
ranges are tested beside its module (test_lsq, test_pact, test_ema, test_base)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.qat import finalize, prepare_qat
from edgequant.qat.base import QATQuantizer
from edgequant.qat.ema import EMAQuantizer
from edgequant.qat.lsq import LSQQuantizer
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


def test_a_weight_only_recipe_starts_from_the_weight_only_ptq_model(tiny_model, calib):
    """A weight-only recipe trains weights and their step sizes; in eval it is the weight-only
    PTQ model (causal LMs: tests/qat/test_causal_lm.py)."""
    ptq = eq.quantize(tiny_model, "w4-weight-only", calib, method="weight_only")
    qat = prepare_qat(tiny_model, "w4-weight-only", calib)
    assert not any(q.role == "activation" and q.mode == "quantize" for q in quantizers(qat))
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(qat.eval()(x), ptq(x))


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


@pytest.mark.parametrize("target", ["mcu-int8", "executorch"])
def test_prepare_qat_refuses_what_the_target_cannot_run_before_any_work(target: str) -> None:
    """As eq.quantize does: an adaptive max pool of uneven windows (10 steps into 3) for the
    targets whose files have none, and a weight-only recipe for a fully integer target, are
    refused at the first batch, naming the op and the layer; even windows are prepared."""
    from toys import AdaptivePools  # tests/toys.py

    read: list[int] = []

    def calib(steps: int):  # type: ignore[no-untyped-def]
        for i in range(3):
            read.append(i)
            yield torch.randn(4, 2, steps)

    model = AdaptivePools(functional=True).eval()
    recipe = eq.Recipe.preset("w8a8").for_target(target)
    with pytest.raises(ValueError, match=r"adaptive_max_pool1d \(uneven windows\)' at 'head"):
        eq.prepare_qat(model, recipe, calib(10))
    assert read == [0]
    assert eq.prepare_qat(model, recipe, calib(12)) is not None
    if target == "mcu-int8":
        with pytest.raises(ValueError, match="mcu-int8"):
            eq.prepare_qat(model, eq.Recipe.preset("w8-weight-only").for_target(target), calib(12))


@pytest.mark.parametrize(
    ("recipe", "method"),
    [
        (eq.Recipe.preset("w4a8").replace(smooth_alpha=None, split_outliers=None), "static"),
        ("w4-weight-only", "weight_only"),
    ],
)
def test_a_given_ptq_model_is_the_start_without_quantizing_again(tiny_model, calib, recipe, method):
    """start=<the model eq.quantize returned> trains a copy of it: in eval it computes what
    prepare_qat's own PTQ start computes, and the given model is left as it was."""
    ptq = eq.quantize(tiny_model, recipe, calib, method=method)
    before = {k: v.clone() for k, v in ptq.named_parameters()}
    qat = prepare_qat(tiny_model, recipe, calib, start=ptq)
    own = prepare_qat(tiny_model, recipe, calib)
    assert qat.quant_info["start"] == "ptq (given)"
    assert any("from the given" in n for n in qat.quant_summary.notes)
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(qat.eval()(x), own.eval()(x))
    assert all(torch.equal(v, before[k]) for k, v in ptq.named_parameters())
    assert qat is not ptq


def test_a_given_start_of_another_method_or_recipe_is_refused_by_name(tiny_model, calib):
    plain = eq.Recipe.preset("w4a8").replace(smooth_alpha=None, split_outliers=None)
    dynamic = eq.quantize(tiny_model, "w8a8", method="dynamic")
    with pytest.raises(ValueError, match="starts from a static PTQ model.*'dynamic'"):
        prepare_qat(tiny_model, plain, calib, start=dynamic)
    w8 = eq.quantize(tiny_model, plain.replace(weight=eq.Recipe.preset("w8a8").weight), calib)
    with pytest.raises(ValueError, match="recipe has weight="):
        prepare_qat(tiny_model, plain, calib, start=w8)
    smoothed = eq.quantize(tiny_model, plain.replace(smooth_alpha=0.5), calib)
    with pytest.raises(ValueError, match="smoothed or has split input channels"):
        prepare_qat(tiny_model, plain.replace(smooth_alpha=0.5), calib, start=smoothed)
    with pytest.raises(ValueError, match="starts from a static PTQ model.*not a quantized model"):
        prepare_qat(tiny_model, plain, calib, start=tiny_model)
