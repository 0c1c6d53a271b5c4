"""Scale refit after rounding: with the integer codes fixed (GPTQ's or round to nearest), each
weight row's scales (one per group, or one per row on a per-channel grid) are solved in closed
form for the least output error on the calibration inputs. GPTQ chooses the codes for a grid
fixed beforehand; once the codes are known, the grid's step that best reproduces the float
output is a linear least-squares problem (the "scale re-estimation" step of GPTQ/AWQ follow-ups
such as NNCF's scale estimation; here on the exact output error rather than a diagonal proxy).

For row r with float weights w (in,), codes q (in,), zero point z and groups g, the dequantized
row is sum_g s_g a_g with a_g = (q - z) on the group's inputs and 0 elsewhere; its output error
on inputs X with H = X^T X is (sum_g s_g a_g - w)^T H (sum_g s_g a_g - w), minimised by
M s = b with M_gh = a_g^T H a_h and b_g = a_g^T H w. Rows whose solution is not finite, or has
a scale <= 0, or does not lower the error, keep their scales.

Shapes: weight, codes (out, in); scale (out, groups); h (in, in).
"""

from __future__ import annotations

import torch
from torch import Tensor


def refit_scales(weight: Tensor, codes: Tensor, scale: Tensor, h: Tensor) -> Tensor:
    """The scales (out, groups) minimising each row's output error with `codes` (out, in,
    already minus the zero point) fixed; `scale` (out, groups) is the current grid."""
    out_features, in_features = weight.shape
    groups = scale.shape[1]
    if in_features % groups:
        raise ValueError(f"{groups} groups do not divide {in_features} inputs")
    size = in_features // groups
    w = weight.double()
    q = codes.double()
    hd = h.double()
    qg = q.reshape(out_features, groups, size)
    m = torch.empty(out_features, groups, groups, dtype=torch.float64)
    b = torch.empty(out_features, groups, dtype=torch.float64)
    for g in range(groups):  # one group's rows of H at a time: memory (out, in)
        part = qg[:, g] @ hd[g * size : (g + 1) * size]  # (out, in): sum_i q_i H_ij
        m[:, g] = (part.reshape(out_features, groups, size) * qg).sum(dim=2)
        b[:, g] = (part * w).sum(dim=1)
    # A tiny ridge keeps rows with an all-zero group solvable; such a group keeps its scale
    # through the checks below.
    ridge = 1e-9 * m.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
    m = m + ridge[:, None, None] * torch.eye(groups, dtype=m.dtype)
    new = torch.linalg.solve(m, b.unsqueeze(2)).squeeze(2)
    old = scale.double()

    def cost(s: Tensor) -> Tensor:
        e = (qg * s.unsqueeze(2)).reshape(out_features, in_features) - w
        return ((e @ hd) * e).sum(dim=1)

    empty = (qg == 0).all(dim=2)  # a group of zero codes has no scale to fit
    new = torch.where(empty, old, new)
    ok = torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1)
    new = torch.where(ok.unsqueeze(1), new, old)
    better = cost(new) < cost(old)
    return torch.where(better.unsqueeze(1), new, old).to(scale.dtype)
