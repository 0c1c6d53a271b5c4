"""ShapeTracer: torch.fx follows tensors made from a traced shape (torch.zeros(x.shape[0], ...)),
and torch's factories are themselves again after tracing, even when tracing fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ZerosShortcut  # tests/zoo.py

from edgequant.check.tracer import SHAPE_FACTORIES, ShapeTracer, shape_trace


def test_plain_fx_cannot_trace_what_shape_trace_can() -> None:
    model = ZerosShortcut().eval()
    with pytest.raises(TypeError):
        torch.fx.symbolic_trace(model)
    gm = shape_trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.zeros) == 1
    x = torch.randn(2, 3, 7, 5)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_factories_are_restored_after_tracing_and_after_a_failure() -> None:
    originals = {name: getattr(torch, name) for name in SHAPE_FACTORIES}

    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx raises
                return x
            return torch.zeros(x.shape[0])

    with pytest.raises(torch.fx.proxy.TraceError):
        ShapeTracer().trace(Fails())
    shape_trace(ZerosShortcut())
    assert {name: getattr(torch, name) for name in SHAPE_FACTORIES} == originals
    # Outside tracing, the factories take plain sizes as always.
    assert torch.zeros(2, 3).shape == (2, 3)
    assert torch.full((2,), 7.0).tolist() == [7.0, 7.0]
