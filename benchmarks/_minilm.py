"""Shared by the all-MiniLM-L6-v2 benchmarks: the model and tokenizer, or a clear skip."""

from __future__ import annotations

import sys
from typing import Any

import torch


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
