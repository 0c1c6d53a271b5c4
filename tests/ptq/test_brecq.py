"""Block reconstruction (ptq/brecq.py): blocks, graph segments, and rounding that beats nearest."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import fx, nn

import edgequant as eq
import edgequant.ptq.static as S
from edgequant.modules import QuantMixin, fast_simulation
from edgequant.ptq import brecq as B
from edgequant.ptq.calibrate import capture_inputs
from edgequant.ptq.static import execution_order
from edgequant.quantizer import quantizers


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


class ResNetlet(nn.Module):
    """stem -> two residual blocks -> pool -> linear: the shape of ResNet-20 in small."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(torch.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _data(n: int = 96, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, 8, 8, generator=g).split(32))


def _nearest_model(preset: str = "w3a4") -> nn.Module:
    recipe = eq.Recipe.preset(preset).replace(rounding="nearest", bias_correction=False)
    return eq.quantize(ResNetlet().eval(), recipe, _data(), method="static")


def _float_copy(qmodel: nn.Module) -> nn.Module:
    ref = copy.deepcopy(qmodel)
    for q in quantizers(ref):
        q.mode = "disabled"
    return ref


def test_layer_groups_follow_parent_modules() -> None:
    names = ["stem", "layer.0.conv1", "layer.0.conv2", "layer.1.conv1", "layer.1.conv2", "fc"]
    layers = [(n, nn.Identity()) for n in names]
    groups = B.layer_groups(layers)  # type: ignore[arg-type]
    assert [[n for n, _ in g] for g in groups] == [
        ["stem"],
        ["layer.0.conv1", "layer.0.conv2"],
        ["layer.1.conv1", "layer.1.conv2"],
        ["fc"],
    ]
    # Top-level layers never merge, even when consecutive.
    assert len(B.layer_groups([("a", nn.Identity()), ("b", nn.Identity())])) == 2  # type: ignore[list-item]


def test_segment_computes_what_the_whole_model_computes() -> None:
    q = _nearest_model()
    assert isinstance(q, fx.GraphModule)
    data = _data()
    plan, skipped = B.block_plan(q, execution_order(q, data[0]))
    assert not skipped
    assert [([n for n, _ in g], stop) for g, stop in plan] == [
        (["stem"], "layer.0.conv1"),
        (["layer.0.conv1", "layer.0.conv2"], "layer.1.conv1"),
        (["layer.1.conv1", "layer.1.conv2"], "fc"),
        (["fc"], None),
    ]
    with fast_simulation(q):
        (group, stop) = plan[1]
        seg = B.Segment(q, group[0][0], stop)
        x = seg.inputs(data)
        with torch.no_grad():
            got = seg.module(*x)
        assert stop is not None
        want = torch.cat(capture_inputs(q, q.get_submodule(stop), data))
        assert torch.equal(got, want)
        last = B.Segment(q, "fc", None)
        with torch.no_grad():
            assert torch.equal(last.module(*last.inputs(data)), torch.cat([q(b) for b in data]))


def test_block_reconstruction_beats_nearest_and_stays_on_the_grid() -> None:
    q = _nearest_model()
    ref = _float_copy(q)
    data = _data()
    plan, _ = B.block_plan(q, execution_order(q, data[0]))
    group, stop = plan[1]
    assert stop is not None
    x = torch.cat(data)

    def block_error() -> float:
        with torch.no_grad(), fast_simulation(q):
            got = torch.cat(capture_inputs(q, q.get_submodule(stop), [x]))
            want = torch.cat(capture_inputs(ref, ref.get_submodule(stop), [x]))
        return float((got - want).square().mean())

    before = block_error()  # round to nearest (the weight quantizers round the float weights)
    with fast_simulation(q):
        B.reconstruct_group(q, ref, group, stop, data, iters=300)  # type: ignore[arg-type]
    after = block_error()
    assert after < before
    for _, layer in group:
        wq = layer.weight_quantizer
        assert wq is not None and wq.mode == "quantize"  # restored after the optimisation
        w = layer.weight.detach()
        assert torch.equal(wq(w), w)  # on the grid


def test_rounding_block_through_quantize_improves_and_exports(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(S, "reconstruct_group", functools.partial(B.reconstruct_group, iters=200))
    model = ResNetlet().eval()
    x = torch.cat(_data(seed=7))
    with torch.no_grad():
        ref = model(x)
    near = _nearest_model()
    recipe = eq.Recipe.preset("w3a4").replace(rounding="block", bias_correction=False)
    block = eq.quantize(model, recipe, _data(), method="static")
    with torch.no_grad():
        err_near = float((near(x) - ref).square().mean())
        err_block = float((block(x) - ref).square().mean())
    assert err_block < err_near
    assert block.quant_info["pipeline"]["rounding"] == "block"
    assert "block weight rounding" in block.quant_info["pipeline"]["steps"]
    info = eq.export_onnx(block, tmp_path / "m.onnx", _data()[0])
    assert info.verification.passed


def test_rounding_block_refuses_a_model_fx_cannot_trace() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.fc(x)
            return self.fc(-x)

    data = [torch.randn(8, 4) for _ in range(2)]
    recipe = eq.Recipe.preset("w4a8").replace(rounding="block")
    with pytest.raises(ValueError, match="rounding='block' needs a model torch.fx can trace"):
        eq.quantize(Untraceable().eval(), recipe, data, method="static")


def test_block_plan_lists_layers_it_cannot_round() -> None:
    q = _nearest_model()
    layers = execution_order(q, _data()[0])
    plan, skipped = B.block_plan(q, layers)
    assert all(isinstance(layer, QuantMixin) for g, _ in plan for _, layer in g)
    plan2, skipped2 = B.block_plan(nn.Sequential(), layers)
    assert not plan2 and set(skipped2) == {n for n, _ in layers}


def test_a_block_the_graph_cannot_give_falls_back_to_layerwise_rounding_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgequant.ptq import adaround

    class TwoHeads(ResNetlet):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            y = self.fc(self.layer(torch.relu(self.stem(x))).mean(dim=(2, 3)))
            return y, y.softmax(dim=1)

    monkeypatch.setattr(S, "reconstruct_group", functools.partial(B.reconstruct_group, iters=50))
    monkeypatch.setitem(
        S.ROUNDERS, "adaround", functools.partial(adaround.round_adaround, iters=50)
    )
    model = TwoHeads().eval()
    near = eq.quantize(
        model,
        eq.Recipe.preset("w3a4").replace(rounding="nearest", bias_correction=False),
        _data(),
        method="static",
    )
    q = eq.quantize(model, "w3a4", _data(), method="static")
    assert q.quant_info["pipeline"]["rounding"] == "block"
    notes = " ".join(q.quant_summary.notes)
    assert "block rounding of fc not possible (the model's output is not a single tensor)" in notes
    fc, fc_near = q.get_submodule("fc"), near.get_submodule("fc")
    assert not torch.equal(fc.weight, fc_near.weight_quantizer(fc_near.weight))  # it was rounded
    x = torch.cat(_data(seed=7))
    with torch.no_grad():
        ref, out = model(x)[0], q(x)[0]
        err_near = float((near(x)[0] - ref).square().mean())
    assert float((out - ref).square().mean()) < err_near
