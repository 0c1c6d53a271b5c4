"""SmoothQuant (ptq/smoothquant.py) in static W8A8 on BERT encoders: one alpha, or chosen per
layer ("auto").

The fast tests use a tiny random BERT (transformers.BertConfig) with planted outlier channels in
its LayerNorms, the way trained transformers have them; the all-MiniLM-L6-v2 check is slow and
lives with benchmarks/static_minilm.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from toys import BERT_LAYERS, bert_batches, bert_hidden, random_bert  # tests/toys.py

import edgequant as eq
from edgequant.functional import sqnr_db
from edgequant.ptq import outliers, smoothquant
from edgequant.ptq.static import build_static

transformers = pytest.importorskip("transformers")


def tiny_bert() -> torch.nn.Module:
    """A 2-layer BERT whose LayerNorm outputs have two outlier channels (x30): the inputs of
    q/k/v and of the FFN's first Linear then have outliers that ruin a per-tensor grid."""
    model = random_bert()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight[:2] *= 30.0
            # As in trained models, the layers reading those channels give them small weights:
            # the outliers carry range, not signal.
            if name.endswith(("query", "key", "value", "intermediate.dense")):
                m.weight[:, :2] /= 30.0
    return model


CALIB = bert_batches([7, 12, 9, 16])  # sequence lengths vary from batch to batch
EVAL = bert_batches([20, 5], seed=1)  # longer and shorter than any calibration batch


def quantize(alpha: float | str | None) -> torch.nn.Module:
    recipe = eq.Recipe.preset("w8a8").replace(smooth_alpha=alpha)
    return eq.quantize(tiny_bert(), recipe, CALIB, method="static")


@pytest.fixture(scope="module")
def auto_model() -> torch.nn.Module:
    """The tiny BERT quantized with per-layer alphas (shared: the tests only read it)."""
    return quantize("auto")


def test_every_encoder_linear_static_per_tensor_and_alphas_recorded(
    auto_model: torch.nn.Module,
) -> None:
    qmodel = auto_model
    linear = [r for r in qmodel.quant_summary.quantized if r.type == "Linear"]
    encoder = [r for r in linear if r.name.startswith("encoder.")]
    assert len(encoder) == 6 * BERT_LAYERS
    assert all("per-tensor" in r.activation and r.weight.startswith("int8") for r in encoder)
    alphas = qmodel.quant_info["pipeline"]["smooth_alphas"]
    assert set(alphas) == {r.name for r in linear}
    # The LayerNorm outliers are what SmoothQuant is for: those inputs are smoothed.
    for i in range(BERT_LAYERS):
        assert alphas[f"encoder.layer.{i}.attention.self.query"] is not None
        assert alphas[f"encoder.layer.{i}.intermediate.dense"] is not None
    assert any("SmoothQuant" in s for s in qmodel.quant_info["pipeline"]["steps"])
    assert qmodel.quant_info["recipe"]["smooth_alpha"] == "auto"
    # The attention matmuls are quantized too (tests/test_attention.py), and the summary says so.
    assert "attention matmuls quantized (4;" in qmodel.quant_summary.format()


def test_smoothing_recovers_the_outlier_model(auto_model: torch.nn.Module) -> None:
    ref = bert_hidden(tiny_bert(), EVAL)
    plain = sqnr_db(ref, bert_hidden(quantize(None), EVAL))
    global_alpha = sqnr_db(ref, bert_hidden(quantize(0.5), EVAL))
    auto = sqnr_db(ref, bert_hidden(auto_model, EVAL))
    # Measured: 28.2 dB without smoothing, 41.1 dB at 0.5, 40.1 dB with alphas per layer (each
    # layer's own error is what "auto" minimises, not the model's).
    assert global_alpha > plain + 8.0
    assert auto > plain + 8.0
    assert auto >= global_alpha - 2.0


def test_choose_alpha_never_worse_than_no_smoothing() -> None:
    qmodel, _, _ = build_static(tiny_bert(), eq.Recipe.preset("w8a8"), CALIB[0])
    stats = smoothquant.input_stats(qmodel, CALIB, 10**6, rows_per_batch=64)
    layer = qmodel.get_submodule("encoder.layer.0.intermediate.dense")
    alpha, err, base = smoothquant.choose_alpha(layer, stats["encoder.layer.0.intermediate.dense"])
    assert alpha is not None and err < 0.5 * base  # the outliers make smoothing pay
    # The reported error is that of the layer smoothed with the chosen alpha.
    st = stats["encoder.layer.0.intermediate.dense"]
    x = torch.cat(st.rows)
    ref = x @ layer.weight.detach().t()
    s = smoothquant.smoothing_factors(st.absmax, layer.weight, alpha)
    assert smoothquant.layer_error(layer, st, s, x, ref) == pytest.approx(err)


@pytest.mark.slow  # minutes on 2 cores: run with the benchmarks (pytest -m slow)
def test_export_runs_in_onnx_runtime_on_unseen_lengths(
    tmp_path: Path, auto_model: torch.nn.Module
) -> None:
    import onnxruntime as ort

    qmodel = auto_model
    path = tmp_path / "bert.onnx"
    info = eq.export_onnx(qmodel, path, CALIB[0], verify_data=EVAL)
    assert info.verification.passed and info.integer_weights >= 6 * BERT_LAYERS
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    sim = bert_hidden(qmodel, EVAL)
    dep = torch.cat(
        [
            torch.from_numpy(sess.run(None, {k: b[k].numpy() for k in names})[0]).flatten(0, 1)
            for b in EVAL
        ]
    )
    assert sqnr_db(sim, dep) > 30.0


@pytest.mark.parametrize("alpha", [1.5, -0.1, "best", True])
def test_bad_alpha_is_refused(alpha: Any) -> None:
    with pytest.raises(ValueError, match="smooth_alpha"):
        eq.Recipe.preset("w8a8").replace(smooth_alpha=alpha)
    qmodel, _, _ = build_static(tiny_bert(), eq.Recipe.preset("w8a8"), CALIB[0])
    if not isinstance(alpha, bool):
        with pytest.raises(ValueError, match="alpha"):
            outliers.smooth_(qmodel, CALIB, alpha, 10**6)


def test_smoothing_twice_is_refused() -> None:
    qmodel, _, _ = build_static(tiny_bert(), eq.Recipe.preset("w8a8"), CALIB[0])
    outliers.smooth_(qmodel, CALIB, 0.5, 10**6)
    with pytest.raises(ValueError, match="already smoothed"):
        outliers.smooth_(qmodel, CALIB, 0.5, 10**6)


@pytest.mark.slow
def test_minilm_static_w8a8_deployed() -> None:
    """all-MiniLM-L6-v2, per-layer alpha, 128 calibration sentences, 128 evaluation sentences
    deployed in ONNX Runtime (the full 640 run in benchmarks/static_minilm.py)."""
    import tempfile

    import onnxruntime as ort

    from edgequant.examples import minilm as M

    try:
        model, tok = M.load_minilm()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: {err}")
    calib = M.tokenize_batches(tok, M.calibration_sentences(), batch_size=16)
    evals = M.tokenize_batches(tok, M.eval_sentences()[:128], batch_size=32)
    qmodel = eq.quantize(
        model, eq.Recipe.preset("w8a8").replace(smooth_alpha="auto"), calib, method="static"
    )
    path = Path(tempfile.mkdtemp()) / "minilm.onnx"
    eq.export_onnx(qmodel, path, calib[0], verify_data=evals[:1])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    report = M.cosine_report(
        M.embed(model, evals),
        M.embed(lambda **b: sess.run(None, {k: b[k].numpy() for k in names}), evals),
    )
    assert report["mean_cosine"] >= 0.997
    assert report["min_cosine"] >= 0.98
