"""SmolLM2-135M-Instruct and WikiText-2 as an example language model, fully offline.

The model is the GGUF file in the shared folder (``models/smollm2_135m``), loaded by transformers'
own GGUF reader as an FP32 ``LlamaForCausalLM`` (packages ``gguf`` and ``accelerate``, dev
extras); its tokenizer is inside the file. Converting that tokenizer takes seconds, so the
converted one is kept under ``~/.cache/edgequant`` (outside the project; keyed by the file's size
and modification time). Text: ``data/text/wikitext2_raw_test.txt`` for evaluation and
``data/text/wikitext2_valid_tokenized.txt`` for calibration (disjoint from the test text).

Windows are non-overlapping: the text is tokenized in one piece and cut into consecutive
windows of ``seq_len`` tokens (the last partial window dropped); see ``edgequant.metrics``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edgequant.examples.shared import require_shared

__all__ = [
    "GGUF_FILE",
    "MODEL_DIR",
    "TEST_TEXT",
    "VALID_TEXT",
    "calibration_batches",
    "load_smollm2",
    "load_tokenizer",
    "text_windows",
    "token_windows",
]

MODEL_DIR = "models/smollm2_135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_TEXT = "data/text/wikitext2_raw_test.txt"
VALID_TEXT = "data/text/wikitext2_valid_tokenized.txt"
SHAKESPEARE_TEXT = "data/text/tinyshakespeare.txt"


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _gguf_path() -> Path:
    return require_shared(f"{MODEL_DIR}/{GGUF_FILE}")


def _cache_dir(path: Path) -> Path:
    stat = path.stat()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgequant"
    return base / f"smollm2_tokenizer_{stat.st_size}_{int(stat.st_mtime)}"


def load_tokenizer() -> Any:
    """The tokenizer inside the GGUF file (converted once, then read from the cache)."""
    _offline()
    from transformers import AutoTokenizer

    path = _gguf_path()
    cache = _cache_dir(path)
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    with contextlib.suppress(OSError):  # another process cached it first
        tmp.replace(cache)
    return tokenizer


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """(FP32 LlamaForCausalLM in eval mode, tokenizer). FileNotFoundError when the shared folder
    or the file is absent; ImportError naming the packages when gguf/accelerate are missing."""
    _offline()
    path = _gguf_path()
    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError as err:
            raise ImportError(
                f"loading {path.name} needs the package {package!r}: pip install gguf accelerate "
                "(or: pip install -e '.[dev]')"
            ) from err
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), load_tokenizer()


def text_windows(tokenizer: Any, relpath: str, seq_len: int, count: int | None = None) -> Tensor:
    """The first `count` (all when None) non-overlapping windows of `seq_len` tokens of a shared
    text file, tokenized in one piece, as a (windows, seq_len) int64 tensor."""
    text = require_shared(relpath).read_text(encoding="utf-8")
    if count is not None:
        # Tokenizing 1.3 MB takes seconds: cut the text to what the windows need (a token is
        # rarely more than 12 characters), then check it was enough.
        text = text[: seq_len * count * 12]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return token_windows(ids, seq_len, count)


def token_windows(ids: Tensor, seq_len: int, count: int | None = None) -> Tensor:
    """Consecutive windows of `seq_len` of a 1-D token tensor (the last partial one dropped)."""
    n = ids.numel() // seq_len
    if count is not None:
        if n < count:
            raise ValueError(f"the text holds {n} windows of {seq_len} tokens, {count} asked for")
        n = count
    return ids[: n * seq_len].reshape(n, seq_len).to(torch.int64)


def calibration_batches(
    tokenizer: Any, seq_len: int = 512, count: int = 64, batch_size: int = 8
) -> list[dict[str, Tensor]]:
    """Dict batches {input_ids, attention_mask} of the calibration text (WikiText-2 validation)."""
    windows = text_windows(tokenizer, VALID_TEXT, seq_len, count)
    return [
        {"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)
    ]
