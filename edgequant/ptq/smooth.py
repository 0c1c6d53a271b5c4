"""SmoothQuant: migrate activation outliers into the weights.
Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, section 4 (eq. 4): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

Each smoothed layer computes (X diag(s)^-1) (diag(s) W^T): the same product, but the per-channel
outliers of X are divided down and the weights, which quantize per output channel anyway, absorb
them. The division is an explicit per-channel multiply on the input (one elementwise op), so it
works whatever produced the input (a GELU, an attention product); where it can be folded into a
preceding LayerNorm it costs nothing, which a later pass may do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from edgequant.instrument import batch_size, call_model
from edgequant.modules import QuantLinear


@torch.no_grad()
def input_channel_absmax(
    qmodel: nn.Module, batches: Iterable[Any], num_samples: int
) -> dict[str, Tensor]:
    """max |x_j| over the calibration data of every QuantLinear's input channel j (float run)."""
    stats: dict[str, Tensor] = {}
    hooks = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax

        return record

    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    seen = 0
    try:
        for batch in batches:
            call_model(qmodel, batch)
            seen += batch_size(batch)
            if seen >= num_samples:
                break
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def smooth_(qmodel: nn.Module, batches: Iterable[Any], alpha: float, num_samples: int) -> list[str]:
    """Smooth every QuantLinear of qmodel in place (its quantizers must not be calibrated yet)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    stats = input_channel_absmax(qmodel, batches, num_samples)
    done = []
    for name, amax_x in stats.items():
        layer: Any = qmodel.get_submodule(name)
        amax_w = layer.weight.abs().amax(dim=0).float()
        s = (amax_x.clamp(min=1e-5).pow(alpha) / amax_w.clamp(min=1e-5).pow(1.0 - alpha)).clamp(
            min=1e-5
        )
        layer.weight.mul_(s.to(layer.weight.dtype).reshape(1, -1))
        layer.input_smooth_inv = (1.0 / s).to(layer.weight.dtype)
        done.append(name)
    return done
