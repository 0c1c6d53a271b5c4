"""Learned rounding of weights: GPTQ (Frantar et al. 2022) and AdaRound (Nagel et al. 2020).

Round-to-nearest treats every weight on its own. Both methods here round a layer's weights so that
the layer's *output* on calibration inputs stays close to the float output:

- GPTQ quantizes one input column at a time and spreads each column's rounding error over the
  columns not yet quantized, using the inverse Hessian of the layer's squared output error,
  H = 2 X X^T (X: the layer's inputs, im2col for convolutions). One pass, closed form.
- AdaRound learns, for every weight, whether to round up or down: a soft rounding variable
  h(V) in [0, 1] is trained to minimise the output error plus a regulariser that pushes h to 0
  or 1, then it is frozen to the nearest of the two.

Both keep the grid the weight quantizer was calibrated with (its scale and zero point) and write the
result back as the layer's weight, on the grid, so fake quantization, the integer form and the
exported INT4/INT8 initializers all read the same integers. Layers are processed in execution
order, each with its inputs as the partly quantized model computes them (activations quantized,
earlier layers already rounded), so later layers compensate for earlier ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.modules import QuantMixin
from edgequant.quantizer import TensorQuantizer


def _grid(layer: QuantMixin) -> tuple[Tensor, Tensor, int, int]:
    """Scale and zero point expanded to the weight's shape, and the grid's bounds."""
    wq = layer.weight_quantizer
    assert wq is not None and wq.calibrated
    w = layer.weight
    scale = F._broadcast(wq.scale.float(), w, wq.axis, wq.spec.group_size).expand_as(w)
    zp = F._broadcast(wq.zero_point.float(), w, wq.axis, wq.spec.group_size).expand_as(w)
    return scale.detach(), zp.detach(), wq.spec.qmin, wq.spec.qmax


def layer_input(layer: QuantMixin, x: Tensor) -> Tensor:
    """What the layer's weight multiplies: x split, smoothed and quantized as the layer does it."""
    x = layer.transform_input(x)
    iq = layer.input_quantizer
    if iq is not None and not layer.shared_input and iq.mode in ("quantize", "dynamic"):
        x = iq(x)
    return x


def as_columns(layer: QuantMixin, x: Tensor) -> Tensor:
    """The layer's input as a (samples, weight columns) matrix: im2col for convolutions."""
    if isinstance(layer, nn.Conv2d):
        cols = torch_F.unfold(
            x,
            cast(tuple[int, int], layer.kernel_size),
            dilation=cast(tuple[int, int], layer.dilation),
            padding=cast(tuple[int, int], layer.padding),
            stride=cast(tuple[int, int], layer.stride),
        )  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(layer, nn.Conv1d):
        cols = torch_F.unfold(
            x.unsqueeze(2),
            (1, layer.kernel_size[0]),
            dilation=(1, layer.dilation[0]),
            padding=(0, cast(tuple[int], layer.padding)[0]),
            stride=(1, layer.stride[0]),
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def supports(layer: QuantMixin) -> str | None:
    """None when learned rounding applies to this layer, else the reason it does not."""
    if layer.weight_quantizer is None or layer.weight_quantizer.mode != "quantize":
        return "weights not quantized"
    if isinstance(layer, nn.Embedding):
        return "an embedding table (no input to reconstruct)"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups})"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return "padding other than explicit zeros"
        return None
    if isinstance(layer, nn.Linear):
        return None
    return f"{type(layer).__name__} layers"


def hessian(
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
        h, cross = cast(tuple[Tensor, Tensor], hessian(layer, inputs, targets))
        weight = input_error_target(layer.weight, h, cross)
    else:
        h, weight = cast(Tensor, hessian(layer, inputs)), layer.weight
    search_clipping_(layer, weight, h)
    scale, zp, qmin, qmax = _grid(layer)
    new = gptq_weight(weight, h, scale, zp, qmin, qmax, **options)
    with torch.no_grad():
        layer.weight.copy_(new)


# --- AdaRound ---------------------------------------------------------------------------------
_ZETA, _GAMMA = 1.1, -0.1


def _rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def on_grid(levels: Tensor, zp: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """The weight of `levels` (floor + h, in steps) on the quantizer's grid, clamped to its
    range."""
    return (torch.clamp(levels + zp, qmin, qmax) - zp) * scale


def soft_rounding(w: Tensor, scale: Tensor) -> tuple[Tensor, nn.Parameter]:
    """floor(w / scale) and the rounding variable V, with h(V) at the fractional part: the soft
    weight floor + h(V) starts at the float weight."""
    w_floor = torch.floor(w / scale)
    rest = w / scale - w_floor
    v = nn.Parameter(
        -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA).clamp_min(1e-6) - 1).clamp(-8, 8)
    )
    return w_floor, v


def rounding_penalty(vs: list[nn.Parameter], it: int, iters: int, reg: float) -> Tensor | None:
    """AdaRound's regulariser, pushing h(V) to 0 or 1, with beta annealed from 20 to 2 after a
    20 % warm-up (None during the warm-up), as in the paper."""
    frac = it / max(iters - 1, 1)
    if frac < 0.2:
        return None
    beta = 2 + (20 - 2) * 0.5 * (1 + math.cos(math.pi * (frac - 0.2) / 0.8))
    total = sum(reg * (1 - (2 * _rectified_sigmoid(v) - 1).abs().pow(beta)).sum() for v in vs)
    return cast(Tensor, total)


def round_adaround(
    layer: QuantMixin,
    inputs: list[Tensor],
    targets: list[Tensor] | None = None,
    iters: int = 500,
    batch_rows: int = 2048,
    max_rows: int = 65536,
    lr: float = 1e-2,
    reg: float = 0.01,
    seed: int = 0,
) -> None:
    """AdaRound on one layer: learn up/down rounding to reconstruct the layer's output.

    The target is the float layer's output on the same (quantized) inputs, or `targets` (the
    float model's inputs to this layer, for the asymmetric reconstruction of the paper) when given.
    Works on the im2col form, so every layer type `as_columns` knows is a matrix product.
    """
    scale, zp, qmin, qmax = _grid(layer)
    shape = layer.weight.shape
    w = layer.weight.detach().reshape(shape[0], -1).float()
    s = scale.reshape(shape[0], -1).float()
    z = zp.reshape(shape[0], -1).float()
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, max_rows // len(inputs))
    parts_q, parts_f = [], []
    with torch.no_grad():
        # A bounded random sample of im2col rows from every batch keeps memory and time fixed.
        for i, x in enumerate(inputs):
            cq = as_columns(layer, layer_input(layer, x))
            idx = torch.randperm(cq.shape[0], generator=gen)[:per_batch]
            parts_q.append(cq[idx])
            if targets is not None:
                parts_f.append(as_columns(layer, layer.transform_input(targets[i]))[idx])
            else:
                parts_f.append(cq[idx])
    xq, xf = torch.cat(parts_q), torch.cat(parts_f)
    w_floor, v_param = soft_rounding(w, s)
    opt = torch.optim.Adam([v_param], lr=lr)
    target_all = xf @ w.T
    n = xq.shape[0]
    for it in range(iters):
        idx = torch.randint(0, n, (min(batch_rows, n),), generator=gen)
        wq = on_grid(w_floor + _rectified_sigmoid(v_param), z, s, qmin, qmax)
        out = xq[idx] @ wq.T
        rec = (out - target_all[idx]).square().sum(dim=1).mean()
        penalty = rounding_penalty([v_param], it, iters, reg)
        loss = rec if penalty is None else rec + penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = on_grid(w_floor + (v_param >= 0).float(), z, s, qmin, qmax)
        layer.weight.copy_(hard.reshape(shape))


ROUNDERS: dict[str, Callable[..., None]] = {"gptq": round_gptq, "adaround": round_adaround}


def weight_quantizer(layer: QuantMixin) -> TensorQuantizer:
    assert layer.weight_quantizer is not None
    return layer.weight_quantizer
