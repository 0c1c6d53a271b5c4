"""Shared by the SmolLM2-135M scripts that quantize with a plain weight-only call: the model,
its tokenizer and held-out Shakespeare windows (or a clear skip), and that call's recipe."""

from __future__ import annotations

import sys
from typing import Any

import edgequant as eq
from edgequant.spec import weight_spec


def load_or_skip() -> tuple[Any, Any] | None:
    """(model, tokenizer); None, with the reason on stderr, where transformers or the model's
    files are absent (the caller then exits 0)."""
    from edgequant.examples.smollm2 import load_smollm2

    try:
        return load_smollm2()
    except (FileNotFoundError, ImportError) as err:
        print(f"skipped: {err}", file=sys.stderr)
        return None


def load_with_windows(length: int = 256, count: int = 2) -> tuple[Any, Any, Any] | None:
    """load_or_skip, and `count` held-out Shakespeare windows of `length` tokens."""
    from edgequant.examples.smollm2 import SHAKESPEARE_TEXT, text_windows

    loaded = load_or_skip()
    if loaded is None:
        return None
    model, tok = loaded
    return model, tok, text_windows(tok, SHAKESPEARE_TEXT, length, count)


def cache_shape(model: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's KV cache: the shapes the exported
    file's past_* inputs take (export.lm.run_windows, lm_session callers)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def int4_g64(block_int8_inputs: bool | str | None = None) -> eq.Recipe:
    """Symmetric INT4 weights in groups of 64, the first and last layers (embedding, lm_head) at
    8 bits, no activation quantization; block_int8_inputs as Recipe's (None: its rule)."""
    return eq.Recipe(
        name="g64",
        weight=weight_spec(4, 64),
        activation=None,
        first_last_bits=8,
        block_int8_inputs=block_int8_inputs,
    )
