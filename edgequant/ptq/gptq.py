"""GPTQ: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023.

GPTQ quantizes one input column at a time and spreads each column's rounding error over the
columns not yet quantized, using the inverse of the Hessian of the layer's squared output error,
H = 2 X X^T (X: the layer's inputs, im2col for convolutions). One pass, closed form. (This H is
the layer's input Gram matrix; mixed/hawq.py's Hessian trace is another thing, of the loss.)
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from edgequant.modules import QuantMixin
from edgequant.ptq.rounding import as_columns, layer_input, weight_grid


def gptq_hessian(
    layer: QuantMixin, inputs: list[Tensor], float_inputs: list[Tensor] | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """H = 2/n X^T X over all calibration inputs (float64 accumulation). With the float model's
    inputs to the same layer, also the cross term 2/n X^T X_float."""
    cols = layer.weight[0].numel()
    h = torch.zeros(cols, cols, dtype=torch.float64)
    cross = torch.zeros(cols, cols, dtype=torch.float64) if float_inputs is not None else None
    n = 0
    with torch.no_grad():
        for i, batch in enumerate(inputs):
            fbatch = float_inputs[i].split(16) if float_inputs is not None else None
            for j, x in enumerate(batch.split(16)):  # bounded memory: im2col grows k*k times
                c = as_columns(layer, layer_input(layer, x))
                h += (c.T @ c).double()
                if cross is not None and fbatch is not None:
                    cf = as_columns(layer, layer.transform_input(fbatch[j]))
                    cross += (c.T @ cf).double()
                n += c.shape[0]
    if cross is not None:
        return h * (2.0 / max(n, 1)), cross * (2.0 / max(n, 1))
    return h * (2.0 / max(n, 1))


def input_error_target(weight: Tensor, h: Tensor, cross: Tensor, damp: float = 0.01) -> Tensor:
    """The float weight W' whose output on the quantized inputs best matches the float layer's
    output on the float inputs: argmin ||W' X_q - W X_f||^2 = W X_f X_q^T (X_q X_q^T)^-1.
    GPTQ then rounds W' instead of W, so the layer also absorbs its input's quantization error
    (the asymmetric calibration of GPTAQ / Qronos).

    The damping regularises the solve towards W, not towards 0: argmin ||W' X_q - W X_f||^2 +
    lambda ||W' - W||^2, i.e. W' = W + W (C - H)^T (H + lambda I)^-1 with C = X_q^T X_f. So
    W' = W exactly when the inputs carry no error (C = H), whatever the damping; damping towards
    0 instead shrank every weight along the inputs' low-variance directions, which on inputs with
    a few outlier channels (transformer hidden states) cost more than the target gained."""
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).double()
    hd = h + torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.mean(torch.diag(h))
    # Solve (H + lambda I) D^T = (C - H) W^T for the correction D = W' - W.
    delta = torch.linalg.solve(hd, (cross - h) @ w.T).T
    return (w + delta).reshape(shape).to(weight.dtype)


def gptq_weight(
    weight: Tensor,
    h: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> Tensor:
    """GPTQ on one weight (out, ...) with Hessian h (cols, cols); scale and zero point are
    expanded to the weight's shape. Returns the dequantized weight, on the grid."""
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).double().clone()
    s = scale.reshape(shape[0], -1).double()
    z = zero_point.reshape(shape[0], -1).double()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, s, z = w[:, perm], s[:, perm], z[:, perm]
        h = h[perm][:, perm]
    cols = w.shape[1]
    h += torch.eye(cols, dtype=h.dtype) * damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    def quant(col: Tensor, j: int) -> Tensor:
        q = torch.clamp(torch.round(col / s[:, j]) + z[:, j], qmin, qmax)
        return (q - z[:, j]) * s[:, j]

    out = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = quant(col, i1 + i)
            out[:, i1 + i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return out.reshape(shape).to(weight.dtype)


# Grids this coarse get their per-channel clipping searched against the layer's output error.
CLIP_SEARCH_MAX_BITS = 3

# The damping round_gptq uses, as a fraction of the Hessian's mean diagonal: GPTQ's own (on
# the column solve; damping() picks it) and the input-error target's (towards the float weight).
GPTQ_DAMP = 0.01
TARGET_DAMP = 0.01
# GPTQ's column damping where it rounds towards the float target: on ResNet-20's 2.5-bit mixed
# plan from 1,024 images, 0.1 lowered the held-out KL to FP32 on the clean and the JPEG'd
# held-out images, on two draws of the calibration images; at W4A8 (own target) it raised both
# (BENCHMARKS.md, 2026-12-07).
FLOAT_TARGET_DAMP = 0.1
FLOAT_TARGET_DAMP_WHY = (
    "float rounding target: a Hessian from the calibration images overfits less with more "
    "damping (held-out KL, ResNet-20 2.5-bit plan)"
)


def damping(recipe_damp: float | None, float_target: bool) -> tuple[float, str]:
    """(GPTQ's column damping, why): the recipe's, else FLOAT_TARGET_DAMP where GPTQ rounds
    towards the float model's output of each layer, else GPTQ's own GPTQ_DAMP."""
    if recipe_damp is not None:
        return float(recipe_damp), "recipe"
    if float_target:
        return FLOAT_TARGET_DAMP, FLOAT_TARGET_DAMP_WHY
    return GPTQ_DAMP, "GPTQ's own damping (rounding target: the layer's float weight)"


CLIP_RATIOS = torch.linspace(0.6, 1.4, 33)


def search_clipping_(layer: QuantMixin, weight: Tensor, h: Tensor) -> bool:
    """Rescale each output channel's step of the weight quantizer (in place) to the ratio of
    CLIP_RATIOS that minimises the channel's output error under round-to-nearest,
    e^T H e with e = w - q(w), instead of the weight error e^T e that the MSE observer
    minimises: at 2-3 bits the two disagree, because the inputs weight the weight columns very
    unequally. Chosen on ResNet-20's held-out images (BENCHMARKS.md, issue 11). Applies to
    symmetric per-channel grids with free (not power-of-two) scales; returns whether it did."""
    wq = layer.weight_quantizer
    assert wq is not None
    spec = wq.spec
    if not (
        spec.bits <= CLIP_SEARCH_MAX_BITS
        and spec.symmetric
        and wq.axis == 0
        and spec.group_size is None
        and spec.scale_type != "pow2"
        and wq.scale.numel() == weight.shape[0]
    ):
        return False
    w = weight.detach().reshape(weight.shape[0], -1).double()
    base = wq.scale.detach().double().reshape(-1, 1)
    zp = wq.zero_point.detach().double().reshape(-1, 1)
    hd = h.double()
    best = torch.full((w.shape[0],), float("inf"), dtype=torch.float64)
    ratio = torch.ones(w.shape[0], dtype=torch.float64)
    for r in CLIP_RATIOS.tolist():
        s = base * r
        e = w - (torch.clamp(torch.round(w / s) + zp, spec.qmin, spec.qmax) - zp) * s
        cost = ((e @ hd) * e).sum(dim=1)
        better = cost < best
        best = torch.where(better, cost, best)
        ratio = torch.where(better, torch.full_like(ratio, r), ratio)
    with torch.no_grad():
        wq.scale.copy_((base.squeeze(1) * ratio).to(wq.scale.dtype).reshape(wq.scale.shape))
    return True


def round_gptq(
    layer: QuantMixin,
    inputs: list[Tensor],
    targets: list[Tensor] | None = None,
    **options: Any,
) -> None:
    """Replace the layer's weight by its GPTQ rounding on the weight quantizer's grid. With
    `targets` (the float model's inputs to this layer) the rounding also corrects the input's
    quantization error (input_error_target). At <= CLIP_SEARCH_MAX_BITS the grid's per-channel
    steps are first searched against the output error (search_clipping_)."""
    if targets is not None:
        h, cross = cast(tuple[Tensor, Tensor], gptq_hessian(layer, inputs, targets))
        weight = input_error_target(layer.weight, h, cross, damp=TARGET_DAMP)
    else:
        h, weight = cast(Tensor, gptq_hessian(layer, inputs)), layer.weight
    search_clipping_(layer, weight, h)
    scale, zp, qmin, qmax = weight_grid(layer)
    new = gptq_weight(weight, h, scale, zp, qmin, qmax, **{"damp": GPTQ_DAMP, **options})
    with torch.no_grad():
        layer.weight.copy_(new)
