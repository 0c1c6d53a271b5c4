"""AdaRound (ptq/adaround.py): learned rounding of one layer against round-to-nearest."""

from __future__ import annotations

import torch
from torch import nn

from edgequant.modules import from_float
from edgequant.ptq.adaround import round_adaround
from edgequant.spec import weight_spec


def test_adaround_reconstructs_better_than_nearest() -> None:
    torch.manual_seed(0)
    layer = from_float(nn.Linear(32, 16), weight_spec(3), None, "fc")
    wq = layer.weight_quantizer
    wq.calibrate_tensor(layer.weight)
    wq.set_mode("quantize")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 32, generator=g) @ torch.randn(32, 32, generator=g)
    w_float = layer.weight.detach().clone()
    before = float((torch.nn.functional.linear(x, wq(w_float)) - x @ w_float.T).square().mean())
    round_adaround(layer, [x], iters=150)  # type: ignore[arg-type]
    w_new = layer.weight.detach()
    # The new weight is on the grid: the quantizer leaves it unchanged.
    assert torch.equal(wq(w_new), w_new)
    after = float((x @ w_new.T - x @ w_float.T).square().mean())
    assert after < before
