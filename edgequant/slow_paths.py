"""PyTorch modules with fused fast paths (nn.MultiheadAttention, nn.TransformerEncoderLayer,
nn.TransformerEncoder) swapped for subclasses that always take the path calling their
submodules, so their Linear layers can be quantized."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """PyTorch's fused attention fast path off for the duration, restored after (even on error)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class SlowPathMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention that always takes PyTorch's reference path: the same function,
    never the fused kernel (torch._native_multi_head_attention), which no exporter translates."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _mha_fastpath_disabled():
            return super().forward(*args, **kwargs)


class SlowPathTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer that always takes PyTorch's reference path, which calls its
    submodules (linear1, linear2, the norms); in eval mode its fused fast path reads their
    weights directly, so a quantized linear1 would never see data."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _mha_fastpath_disabled():
            return super().forward(*args, **kwargs)


class SlowPathTransformerEncoder(nn.TransformerEncoder):
    """nn.TransformerEncoder without its fast path (nested tensors from the padding mask)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _mha_fastpath_disabled():
            return super().forward(*args, **kwargs)


_SLOW_PATHS: dict[type[nn.Module], type[nn.Module]] = {
    nn.MultiheadAttention: SlowPathMultiheadAttention,
    nn.TransformerEncoderLayer: SlowPathTransformerEncoderLayer,
    nn.TransformerEncoder: SlowPathTransformerEncoder,
}


def take_slow_paths(model: nn.Module) -> list[str]:
    """Switch (in place) every PyTorch module with a fused eval-mode fast path to the class that
    always takes the reference path; return notes for the summary.

    Same parameters, buffers and state-dict keys; only the fast path is gone. The projections
    stay float: F.multi_head_attention_forward reads in_proj_weight (a raw parameter) and
    out_proj's weight and bias directly, never calling out_proj as a module (its two matmuls of
    activations are quantized by edgequant/attention.py).
    """
    notes = []
    for name, module in model.named_modules():
        slow = _SLOW_PATHS.get(type(module))
        if slow is None:
            continue
        module.__class__ = slow
        if isinstance(module, nn.MultiheadAttention):
            notes.append(
                f"{name} (MultiheadAttention): its fused fast path is off; its in- and output "
                "projections stay float (PyTorch's attention reads in_proj_weight and "
                "out_proj's weight as parameters, never calling a layer edgequant could "
                "quantize); its attention matmuls are quantized where the method does so"
            )
        elif isinstance(module, nn.TransformerEncoderLayer):
            notes.append(
                f"{name} (TransformerEncoderLayer): fused fast path off, so linear1 and linear2 "
                "run as layers and are quantized"
            )
    return notes
