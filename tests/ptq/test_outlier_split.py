"""Outlier channel splitting of Linear inputs (Recipe.split_outliers, ptq/outliers.py).

A tiny random BERT whose FFN has one planted outlier channel after its GELU (the massive
activation trained transformers carry in their FFN-output inputs): a per-tensor grid of that
input is set by the one channel, and splitting it gives the other channels their resolution back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from toys import (
    BERT_FFN,
    BERT_HIDDEN,
    BERT_LAYERS,
    bert_batches,
    bert_hidden,
    random_bert,
)  # tests/toys.py

import edgequant as eq
from edgequant.functional import sqnr_db
from edgequant.modules import split_concat_order
from edgequant.ptq import outlier_split, outliers
from edgequant.ptq.static import build_static

transformers = pytest.importorskip("transformers")

OUTLIER = 3  # the FFN channel with the planted outlier


def outlier_bert() -> torch.nn.Module:
    model = random_bert()
    with torch.no_grad():
        for i in range(BERT_LAYERS):
            layer: Any = model.encoder.layer[i]
            # GELU output channel OUTLIER ~40x the others; the next Linear reads it with a
            # small weight (it carries range, not signal), as in trained models.
            layer.intermediate.dense.weight[OUTLIER] *= 40.0
            layer.intermediate.dense.bias[OUTLIER] = 40.0
            layer.output.dense.weight[:, OUTLIER] /= 40.0
    return model


CALIB = bert_batches([7, 12, 9, 16])
EVAL = bert_batches([20, 5], seed=1)
FFN_OUT = [f"encoder.layer.{i}.output.dense" for i in range(BERT_LAYERS)]


def recipe(split: float | None, alpha: float | None = None) -> eq.Recipe:
    return eq.Recipe.preset("w8a8").replace(smooth_alpha=alpha, split_outliers=split)


@pytest.fixture(scope="module")
def split_model() -> torch.nn.Module:
    return eq.quantize(outlier_bert(), recipe(0.9), CALIB, method="static")


def test_split_factors() -> None:
    ranges = torch.tensor([1.0, 0.5, 1.0, 10.0, 2.5])
    # The 0.5 quantile is 1.0: channels at or under it stay single, the others ceil(r / 1.0).
    assert outlier_split.split_factors(ranges, 0.5).tolist() == [1, 1, 1, 10, 3]


def test_split_factors_are_bounded_where_most_channels_are_zero() -> None:
    ranges = torch.zeros(1000)
    ranges[:3] = torch.tensor([5.0, 1.0, 0.01])  # the 0.99 quantile is 0
    mult = outlier_split.split_factors(ranges, 0.99)
    assert int(mult.max()) == outlier_split.MAX_COPIES and mult[3:].eq(1).all()
    assert outlier_split.split_factors(torch.zeros(8), 0.5).eq(1).all()


def test_recipe_keeps_split_outliers_in_yaml() -> None:
    r = recipe(0.99, alpha=0.8)
    assert eq.Recipe.from_yaml(r.to_yaml()) == r
    assert "outlier channel splitting" in str(r)


def test_splitting_keeps_the_float_model() -> None:
    """Before calibration (quantizers off) the split model computes what the float model does:
    each copy carries x_j / m_j and the whole weight column."""
    model = outlier_bert()
    qmodel, _, _ = build_static(model, recipe(None), CALIB[0])
    added = outliers.split_outliers_(qmodel, CALIB, 0.9, 10**6)
    for name in FFN_OUT:
        layer: Any = qmodel.get_submodule(name)
        assert added[name] >= 1
        assert (
            layer.weight.shape
            == (BERT_HIDDEN, BERT_FFN + added[name])
            == (BERT_HIDDEN, layer.in_features)
        )
        # The planted channel is the one most repeated.
        counts = torch.bincount(layer.input_channel_index, minlength=BERT_FFN)
        assert int(counts.argmax()) == OUTLIER and int(counts[OUTLIER]) > 10
    torch.testing.assert_close(
        bert_hidden(qmodel, EVAL), bert_hidden(model, EVAL), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="already split"):
        outliers.split_outliers_(qmodel, CALIB, 0.9, 10**6)


def test_splitting_recovers_the_outlier_input(split_model: torch.nn.Module) -> None:
    model = outlier_bert()
    ref = bert_hidden(model, EVAL)
    plain = sqnr_db(
        ref, bert_hidden(eq.quantize(model, recipe(None), CALIB, method="static"), EVAL)
    )
    split = sqnr_db(ref, bert_hidden(split_model, EVAL))
    assert split > plain + 3.0, (plain, split)
    steps = split_model.quant_info["pipeline"]["steps"]
    assert any(s.startswith("outlier channel splitting:") for s in steps)
    assert split_model.quant_info["recipe"]["split_outliers"] == 0.9
    added = split_model.quant_info["pipeline"]["split_channels"]
    assert all(added[n] >= 1 for n in FFN_OUT)


@pytest.mark.slow  # minutes on 2 cores: run with the benchmarks (pytest -m slow)
def test_split_with_smoothing_exports_and_matches_onnx_runtime(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    model = outlier_bert()
    qmodel = eq.quantize(model, recipe(0.9, alpha=0.5), CALIB, method="static")
    path = tmp_path / "bert.onnx"
    info = eq.export_onnx(qmodel, path, CALIB[0], verify_data=EVAL)
    assert info.verification.passed
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Gather") >= BERT_LAYERS + 1  # the embeddings' Gathers and one per split input
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    dep = torch.cat(
        [
            torch.from_numpy(sess.run(None, {k: b[k].numpy() for k in names})[0]).flatten(0, 1)
            for b in EVAL
        ]
    )
    assert sqnr_db(bert_hidden(qmodel, EVAL), dep) > 30.0


def test_saved_split_model_loads(tmp_path: Path, split_model: torch.nn.Module) -> None:
    path = tmp_path / "q.pt"
    torch.save(split_model.state_dict(), path)
    loaded = eq.load(outlier_bert(), recipe(0.9), path, CALIB[0], method="static")
    assert torch.equal(bert_hidden(split_model, EVAL), bert_hidden(loaded, EVAL))


def test_dynamic_quantization_splits_too() -> None:
    model = outlier_bert()
    ref = bert_hidden(model, EVAL)
    plain = eq.quantize(model, recipe(None), CALIB, method="dynamic")
    split = eq.quantize(model, recipe(0.9), CALIB, method="dynamic")
    assert any(n.startswith("outlier channel splitting") for n in split.quant_summary.notes)
    assert sqnr_db(ref, bert_hidden(split, EVAL)) > sqnr_db(ref, bert_hidden(plain, EVAL))


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2, True, "0.9"])
def test_bad_quantile_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="split_outliers"):
        eq.Recipe.preset("w8a8").replace(split_outliers=bad)
    qmodel, _, _ = build_static(outlier_bert(), recipe(None), CALIB[0])
    with pytest.raises((ValueError, TypeError), match="quantile"):
        outliers.split_outliers_(qmodel, CALIB, bad, 10**6)


def test_weight_only_refuses_splitting() -> None:
    r = eq.Recipe.preset("w4-weight-only").replace(split_outliers=0.9)
    with pytest.raises(ValueError, match="split_outliers"):
        eq.quantize(outlier_bert(), r, CALIB, method="weight_only")


def test_split_concat_order_puts_every_channel_first_in_order() -> None:
    index = torch.repeat_interleave(torch.arange(5), torch.tensor([1, 1, 1, 3, 2]))
    order = split_concat_order(index)
    assert order is not None
    assert index[order].tolist() == [0, 1, 2, 3, 4, 3, 3, 4]
    assert split_concat_order(torch.tensor([0, 2, 2])) is None  # channel 1 is missing


def test_split_input_exports_as_concat_of_its_repeated_channels(
    tmp_path: Path, split_model: torch.nn.Module
) -> None:
    """ONNX Runtime gathers along the last axis slowly: the split input is x concatenated with
    a Gather of only its repeated channels, and the file still computes the simulation."""
    import onnx
    from onnx import numpy_helper

    path = tmp_path / "bert.onnx"
    info = eq.export_onnx(split_model, path, CALIB[0], verify_data=EVAL)
    assert info.verification.passed
    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    added = split_model.quant_info["pipeline"]["split_channels"]
    # Gathers along the last axis (the embeddings' gather rows): each takes only the repeated
    # channels of one split input and feeds a Concat with that input.
    along_channels = [
        n
        for n in graph.node
        if n.op_type == "Gather" and any(a.name == "axis" and a.i == -1 for a in n.attribute)
    ]
    assert {consts[n.input[1]].size for n in along_channels} == set(added.values())
    concat_inputs = [list(n.input) for n in graph.node if n.op_type == "Concat"]
    for n in along_channels:
        assert [n.input[0], n.output[0]] in concat_inputs, n.name
