"""Per-tensor LSQ fake-quantize as two fused kernels (forward; backward with its reductions).

PyTorch's fused learnable fake-quantize (`torch._fake_quantize_learnable_per_tensor_affine`)
is exact but slow on CPU: on a ResNet-20 activation (128x16x32x32, 2 threads) its forward and
backward take ~5x the time of the same math compiled by torch.compile (inductor) into one loop
each, which is what keeps the QAT step near the FP32 step. The math is the same as PyTorch's:

    v = x * (1 / s) + z            (float32 reciprocal, as PyTorch and functional.quantize do)
    x_hat = (clamp(round(v), qmin, qmax) - z) * s          (round half to even)
    d x_hat / d x = 1 inside the grid, 0 where clipped     (straight-through estimator)
    d x_hat / d s = round(v) - v inside, qmin - z / qmax - z where clipped    (LSQ, times g)
    d x_hat / d z = 0 inside, -s where clipped                                 (LSQ+, times g)

Large tensors (>= COMPILE_MIN_NUMEL elements) use the compiled kernels once torch.compile works
here (it needs a C++ compiler); otherwise, and for small tensors, the eager PyTorch op runs. The
forward is bit for bit PyTorch's fake-quantize either way (tests/qat/test_kernels.py).
Set EDGEQUANT_QAT_COMPILE=0 to never compile.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

COMPILE_MIN_NUMEL = 1 << 16


def lsq_forward(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    v = x * (1.0 / scale) + zero_point
    q = torch.clamp(torch.round(v), qmin, qmax)
    return (q - zero_point) * scale


def lsq_backward(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    v = x * (1.0 / scale) + zero_point
    r = torch.round(v)
    low = r < qmin
    high = r > qmax
    clipped = low | high
    grad_x = torch.where(clipped, torch.zeros_like(grad), grad)
    d_scale = torch.where(low, qmin - zero_point, torch.where(high, qmax - zero_point, r - v))
    grad_s = (grad * d_scale).sum() * grad_scale
    grad_z = torch.where(clipped, grad, torch.zeros_like(grad)).sum() * (-scale * grad_scale)
    return grad_x, grad_s, grad_z


_COMPILED: dict[str, Callable[..., Any]] = {}
_BROKEN: list[str] = []


def _kernels() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The compiled (forward, backward), or None where torch.compile is off or unavailable."""
    if os.environ.get("EDGEQUANT_QAT_COMPILE", "1") == "0" or _BROKEN:
        return None
    if not _COMPILED:
        _COMPILED["forward"] = torch.compile(lsq_forward, dynamic=True, fullgraph=True)
        _COMPILED["backward"] = torch.compile(lsq_backward, dynamic=True, fullgraph=True)
    return _COMPILED["forward"], _COMPILED["backward"]


def _run(which: int, *args: Any) -> Any:
    kernels = _kernels()
    eager = (lsq_forward, lsq_backward)[which]
    if kernels is None:
        return eager(*args)
    try:
        return kernels[which](*args)
    except Exception as err:  # no C++ compiler, an inductor failure: same math, eagerly
        _BROKEN.append(str(err))
        warnings.warn(
            "edgequant QAT: torch.compile failed, falling back to PyTorch's eager fake-quantize "
            f"(same numbers, slower steps): {type(err).__name__}: {str(err)[:200]}",
            RuntimeWarning,
            stacklevel=3,
        )
        return eager(*args)


class _LSQPerTensor(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor,
        qmin: int,
        qmax: int,
        grad_scale: float,
    ) -> Tensor:
        scale0, zp0 = scale.reshape(()), torch.round(zero_point.reshape(())).clamp(qmin, qmax)
        ctx.save_for_backward(x, scale0, zp0)
        ctx.qrange, ctx.grad_scale = (qmin, qmax), grad_scale
        ctx.shapes = (scale.shape, zero_point.shape)
        out: Tensor = _run(0, x, scale0, zp0, qmin, qmax)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None, None]:
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        grad_x, grad_s, grad_z = _run(
            1, grad.contiguous(), x, scale, zero_point, qmin, qmax, ctx.grad_scale
        )
        return (
            grad_x,
            grad_s.reshape(ctx.shapes[0]),
            grad_z.reshape(ctx.shapes[1]),
            None,
            None,
            None,
        )


def lsq_fake_quantize_per_tensor(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, grad_scale: float
) -> Tensor:
    """Per-tensor LSQ fake-quantize (scale, zero point: one element each, float)."""
    if x.numel() < COMPILE_MIN_NUMEL or x.dtype != torch.float32:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1), zero_point.reshape(1), qmin, qmax, grad_scale
        )
    out: Tensor = _LSQPerTensor.apply(x, scale, zero_point, qmin, qmax, grad_scale)
    return out
