"""Cross-layer equalization (ptq/equalize.py): the float function kept, the ranges balanced."""

from __future__ import annotations

import torch
from toys import Chain, chain_batches  # tests/toys.py

import edgequant as eq
from edgequant import functional as F
from edgequant.ptq.equalize import equalize, find_pairs
from edgequant.ptq.static import build_static


def test_equalization_keeps_the_float_function_and_balances_ranges() -> None:
    model = Chain().eval()
    recipe = eq.Recipe.preset("w4a8")
    qmodel, _, _ = build_static(model, recipe, chain_batches()[0])
    assert ("conv1", "conv2") in find_pairs(qmodel)
    x = chain_batches()[0]
    with torch.no_grad():
        before = qmodel(x)
        equalize(qmodel)
        after = qmodel(x)
    assert F.sqnr_db(before, after) > 80
    r1 = qmodel.conv1.weight.abs().reshape(8, -1).amax(1)
    r2 = qmodel.conv2.weight.abs().transpose(0, 1).reshape(8, -1).amax(1)
    assert torch.allclose(r1, r2, rtol=1e-4)
