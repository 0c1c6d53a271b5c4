"""Factories for smollm2.yaml: SmolLM2-135M-Instruct (the GGUF file in ../shared, loaded as an
FP32 LlamaForCausalLM) and WikiText-2 token windows (edgequant.examples.smollm2).

Calibration and QAT training read the validation text (wikitext2_valid_tokenized.txt): the
first windows calibrate, the next ones train (compare holds every 7th training batch out to
choose the epoch kept). Perplexity is measured on the test text (wikitext2_raw_test.txt), a
disjoint text, over non-overlapping windows: eval_data yields (inputs, token ids) pairs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgequant.examples import smollm2

_TOKENIZER: list[Any] = []  # converted once per process (it takes seconds)


def _tokenizer() -> Any:
    if not _TOKENIZER:
        _TOKENIZER.append(smollm2.load_tokenizer())
    return _TOKENIZER[0]


def model() -> nn.Module:
    lm, _ = smollm2.load_smollm2()
    return lm


def _valid_windows(first: int, count: int, seq_len: int) -> torch.Tensor:
    windows = smollm2.text_windows(_tokenizer(), smollm2.VALID_TEXT, seq_len, first + count)
    return windows[first:]


def calib_batches(count: int = 16, seq_len: int = 512) -> list[dict[str, torch.Tensor]]:
    """The first `count` windows of the validation text, one window a batch."""
    return [{"input_ids": w.reshape(1, -1)} for w in _valid_windows(0, count, seq_len)]


def train_batches(
    count: int = 112, seq_len: int = 512, skip: int = 16
) -> list[dict[str, torch.Tensor]]:
    """`count` windows of the validation text after the first `skip` (the calibration ones),
    one window a batch."""
    return [{"input_ids": w.reshape(1, -1)} for w in _valid_windows(skip, count, seq_len)]


def eval_batches(count: int = 64, seq_len: int = 512) -> list[tuple[dict[str, torch.Tensor], Any]]:
    """The first `count` windows of the test text as ({"input_ids": (1, seq_len)}, ids) pairs."""
    windows = smollm2.text_windows(_tokenizer(), smollm2.TEST_TEXT, seq_len, count)
    return [({"input_ids": w.reshape(1, -1)}, w.reshape(1, -1)) for w in windows]
