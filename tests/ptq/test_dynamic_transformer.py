"""Dynamic W8A8 on a real pretrained transformer (all-MiniLM-L6-v2), end to end: quantize with
SmoothQuant, export, run in ONNX Runtime. Skips where the weights package is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")


@pytest.mark.slow  # minutes on 2 cores: run with the benchmarks (pytest -m slow)
def test_minilm_dynamic_export_keeps_embeddings(tmp_path: Path) -> None:
    import onnxruntime as ort

    import edgequant as eq
    from edgequant.examples import minilm as M

    try:
        model, tok = M.load_minilm()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: {err}")
    calib = M.tokenize_batches(tok, M.calibration_sentences(32), batch_size=16)
    evals = M.tokenize_batches(tok, M.eval_sentences()[:64], batch_size=32)
    recipe = eq.Recipe.preset("w8a8").replace(smooth_alpha=0.7)
    qmodel = eq.quantize(model, recipe, calib, method="dynamic")
    summary = qmodel.quant_summary
    # Every Linear of the encoder and pooler, and the three embedding tables.
    assert sum(r.type == "Linear" for r in summary.quantized) == 37
    assert sum(r.type == "Embedding" for r in summary.quantized) == 3
    path = tmp_path / "minilm.onnx"
    info = eq.export_onnx(qmodel, path, calib[0], verify_data=evals[:1])
    assert info.integer_weights == 40 and info.size_ratio < 0.3
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops

    def deployed(**batch):  # type: ignore[no-untyped-def]
        return sess.run(None, {k: batch[k].numpy() for k in names})

    ref = M.embed(model, evals)
    report = M.cosine_report(ref, M.embed(deployed, evals))
    assert report["mean_cosine"] >= 0.995
    assert report["min_cosine"] >= 0.98
    # The caller's model is untouched: FP32 embeddings equal a fresh load's.
    fresh, _ = M.load_minilm()
    assert np.allclose(M.embed(fresh, evals[:1]).numpy(), ref[:32].numpy())
