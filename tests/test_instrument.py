"""instrument.py: the quantized copy computes the float model while its quantizers are disabled
(BN folding included), the summary says what was quantized and what was skipped and why, first
and last layers follow execution order, and graph-level quantizers go where DESIGN §2 says."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn
from toys import MLP, Keywords, SmallCNN, TinyResidual, Untraceable, gen, rel_err

import edgequant as eq
from edgequant.batches import batch_size, call_model
from edgequant.graph_quantizers import place_graph_quantizers
from edgequant.instrument import instrument, quant_layers
from edgequant.modules import QuantMixin
from edgequant.quantizer import quantizers
from edgequant.summary import Summary


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


# --- toy models ---------------------------------------------------------------------------------


class Conv1dBN(nn.Module):
    """1-D convolutions with a BatchNorm1d to fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 6, 5, padding=2)
        self.bn = nn.BatchNorm1d(6)
        self.conv2 = nn.Conv1d(6, 6, 3, stride=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch_F.relu(self.bn(self.conv1(x)))
        return self.head(torch_F.relu(self.conv2(x)).mean(-1))


MODELS = {
    "cnn": (SmallCNN, (4, 3, 8, 8)),
    "mlp": (MLP, (4, 16)),
    "conv1d": (Conv1dBN, (4, 2, 16)),
    "residual": (TinyResidual, (4, 4, 6, 6)),
}


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    return _randomize_bn(cls()), torch.randn(*shape, generator=gen(1))


# --- the quantized copy, quantizers disabled ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_instrumented_copy_with_quantizers_disabled_computes_the_float_model(name: str) -> None:
    model, x = _model(name)
    with torch.no_grad():
        expected = model(x)
        qmodel, summary = instrument(model, eq.Recipe.preset("w8a8"), x, "static")
        assert all(q.mode == "disabled" for q in quantizers(qmodel))
        actual = qmodel(x)
    assert rel_err(actual, expected) < 1e-5
    assert [r.name for r in summary.quantized] == [n for n, _ in quant_layers(qmodel)]


def test_bn_folding_is_recorded_and_the_bn_removed() -> None:
    model, x = _model("cnn")
    qmodel, summary = instrument(model, eq.Recipe.preset("w8a8"), x, "static")
    folded = {r.name: r.bn_folded for r in summary.layers}
    assert folded == {"conv1": "bn1", "dw": "bn2", "fc": ""}
    assert isinstance(qmodel.bn1, nn.Identity) and isinstance(qmodel.bn2, nn.Identity)
    assert "(+bn1 folded)" in summary.format()
    # fold_bn=False keeps the BatchNorms and the weights as they were.
    kept, summary = instrument(model, eq.Recipe.preset("w8a8"), x, "static", fold_bn=False)
    assert isinstance(kept.bn1, nn.BatchNorm2d)
    assert torch.equal(kept.conv1.weight, model.conv1.weight)
    assert all(r.bn_folded == "" for r in summary.layers)


class SharedConvOutput(nn.Module):
    """The conv's output is read by the BatchNorm and by the add: folding would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean((2, 3)))


class ConvCalledTwice(nn.Module):
    """One conv module applied twice; the BatchNorm follows only the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.conv(y).mean((2, 3)))


@pytest.mark.parametrize(
    ("cls", "shape", "seed"),
    [(SharedConvOutput, (2, 3, 6, 6), 2), (ConvCalledTwice, (2, 4, 6, 6), 3)],
    ids=["the conv output has other readers", "a layer that runs twice"],
)
def test_bn_not_folded(cls: type[nn.Module], shape: tuple[int, ...], seed: int) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(cls())
    x = torch.randn(*shape, generator=gen(seed))
    qmodel, summary = instrument(model, eq.Recipe.preset("w8a8"), x, "static")
    with torch.no_grad():
        assert rel_err(qmodel(x), model(x)) < 1e-5
    assert summary.layers[0].bn_folded == ""


def test_original_model_is_untouched_and_not_aliased() -> None:
    model, x = _model("cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, _ = instrument(model, eq.Recipe.preset("w4a4"), x, "static")
    assert model.training and not qmodel.training
    with torch.no_grad():
        for p in qmodel.parameters():
            p.add_(1.0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert not any(isinstance(m, QuantMixin) for m in model.modules())


# --- what the summary says ----------------------------------------------------------------------


def test_layer_types_limit_what_is_quantized() -> None:
    model, x = _model("cnn")
    _, summary = instrument(model, eq.Recipe.preset("w8a8"), x, "dynamic", layer_types=(nn.Linear,))
    reasons = {r.name: r.reason for r in summary.skipped}
    assert set(reasons) == {"conv1", "dw"}
    assert all(why == "dynamic quantization covers Linear only" for why in reasons.values())


def test_summary_to_dict_is_plain_data() -> None:
    model, x = _model("mlp")
    _, summary = instrument(model, eq.Recipe.preset("w8a8"), x, "static")
    data = summary.to_dict()
    assert data["recipe"] == "w8a8" and data["method"] == "static"
    assert [d["name"] for d in data["layers"]] == ["fc1", "fc2"]
    assert data["layers"][0]["weight"] == "int8 sym per-channel(0) [minmax]"
    assert data["layers"][0]["activation"] == "uint8 asym per-tensor [minmax]"
    assert str(summary) == summary.format()
    assert isinstance(Summary("r", "m").format(), str)


# --- first and last layers ----------------------------------------------------------------------


class Reordered(nn.Module):
    """Declared in one order, executed in another: first/last follow execution."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(8, 2)
        self.middle = nn.Linear(8, 8)
        self.first = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def test_first_and_last_executed_layers_stay_at_8_bits() -> None:
    torch.manual_seed(0)
    qmodel, summary = instrument(
        Reordered().eval(), eq.Recipe.preset("w4a4"), torch.randn(2, 4, generator=gen(7)), "static"
    )
    bits = {
        n: (m.weight_quantizer.spec.bits, m.input_quantizer.spec.bits)
        for n, m in quant_layers(qmodel)
    }
    assert bits == {"first": (8, 8), "middle": (4, 4), "last": (8, 8)}
    records = {r.name: r for r in summary.layers}
    assert records["middle"].weight.startswith("int4") and records["first"].weight.startswith(
        "int8"
    )


def test_first_last_rule_is_off_for_8_bit_presets() -> None:
    torch.manual_seed(0)
    recipe = eq.Recipe.preset("w4a8").replace(first_last_bits=None)
    qmodel, _ = instrument(
        Reordered().eval(), recipe, torch.randn(2, 4, generator=gen(8)), "static"
    )
    assert {m.weight_quantizer.spec.bits for _, m in quant_layers(qmodel)} == {4}


def test_group_size_must_divide_the_weight() -> None:
    torch.manual_seed(0)
    recipe = eq.Recipe(
        weight=eq.QuantSpec(bits=4, granularity="group", axis=1, group_size=5), activation=None
    )
    with pytest.raises(ValueError, match="'fc1'.*group_size 5"):
        instrument(MLP().eval(), recipe, torch.randn(2, 16, generator=gen(9)), "weight_only")


def test_argument_types_are_checked() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        instrument(lambda x: x, eq.Recipe.preset("w8a8"), torch.zeros(1), "static")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Recipe"):
        instrument(MLP(), "w8a8", torch.zeros(1, 16), "static")  # type: ignore[arg-type]


def test_no_quantizable_layer_raises() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with pytest.raises(ValueError, match="no quantizable layer"):
        instrument(model, eq.Recipe.preset("w8a8"), torch.randn(2, 4), "static")


# --- calling the model on calibration items -----------------------------------------------------


def test_call_model_and_batch_size_on_each_item_kind() -> None:
    torch.manual_seed(0)
    model = Keywords().eval()
    features, gain = torch.randn(3, 6), torch.rand(3, 1)
    expected = model(features, gain)
    assert torch.equal(call_model(model, (features, gain)), expected)
    assert torch.equal(call_model(model, [features, gain]), expected)
    assert torch.equal(call_model(model, {"features": features, "gain": gain}), expected)
    assert batch_size(features) == 3 and batch_size((features, gain)) == 3
    assert batch_size({"features": features, "gain": gain}) == 3
    with pytest.raises(TypeError, match="dicts of keyword arguments"):
        call_model(model, 3.0)
    with pytest.raises(TypeError, match="holds no tensor"):
        batch_size(("a", 1))


# --- graph-level quantizers ---------------------------------------------------------------------


def test_residual_block_gets_graph_quantizers() -> None:
    model, x = _model("residual")
    qmodel, summary = instrument(model, eq.Recipe.preset("w8a8"), x, "static")
    gm = place_graph_quantizers(qmodel, summary)
    assert isinstance(gm, torch.fx.GraphModule)
    outputs = {r.name: r.output for r in summary.layers}
    assert outputs == {"conv1": "float", "conv2": "quantized", "fc": "float"}
    # The block input is quantized once, by conv1's quantizer, and the shortcut reads it.
    assert (
        "shared with its other readers" in {r.name: r.activation for r in summary.layers}["conv1"]
    )
    holder = dict(gm.named_children())["output_quantizers"]
    assert sorted(dict(holder.named_children())) == ["conv2", "join_add"]
    assert summary.notes == []


class _FunctionalHead(nn.Module):
    """SmallCNN's layers with a functional pool and torch.flatten, as models are often written."""

    def __init__(self) -> None:
        super().__init__()
        self.body = SmallCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body
        x = b.relu(b.bn1(b.conv1(x)))
        x = torch_F.relu(b.bn2(b.dw(x)))
        return b.fc(torch.flatten(torch_F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("style", ["modules", "functional"])
def test_an_output_read_through_pooling_takes_its_readers_wider_grid(style: str) -> None:
    torch.manual_seed(0)
    model = (SmallCNN() if style == "modules" else _FunctionalHead()).eval()
    x = torch.randn(16, 3, 8, 8, generator=gen(4))
    qmodel = eq.quantize(model, "w4a4", [x], method="static")
    found = dict(qmodel.output_quantizers.named_children())
    layers = {
        n.rsplit(".", 1)[-1]: m for n, m in qmodel.named_modules() if isinstance(m, QuantMixin)
    }
    # The preset keeps the first and last layers at 8 bits; the 4-bit depthwise conv's output
    # reaches the classifier through pooling and flattening alone, so it takes the classifier's
    # 8-bit input grid instead of its own 4-bit one.
    assert (
        layers["dw"].input_quantizer.spec.bits == 4 and layers["fc"].input_quantizer.spec.bits == 8
    )
    ((name, quantizer),) = found.items()
    assert name.endswith("dw") and quantizer.spec == layers["fc"].input_quantizer.spec


def test_untraceable_model_is_returned_unchanged_with_a_note() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, generator=gen(10))
    qmodel, summary = instrument(Untraceable().eval(), eq.Recipe.preset("w8a8"), x, "static")
    assert place_graph_quantizers(qmodel, summary) is qmodel
    assert len(summary.notes) == 1 and "torch.fx could not trace" in summary.notes[0]
    assert "note: activations quantized at layer inputs only" in summary.format()


def test_metric_number_takes_what_metric_functions_return_and_names_the_rest() -> None:
    import numpy as np

    from edgequant.batches import metric_number
    from edgequant.mixed.sensitivity import eval_metric

    for value in (0.5, 1, np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array([0.5])):
        assert metric_number(value, "eval_fn", "the FP32 model") == 0.5 or value == 1
    # Before: mixed precision refused a numpy float32 (not a Python float) that compare accepted.
    assert eval_metric(lambda m: np.float32(0.25), torch.nn.Linear(2, 2), "the FP32 model") == 0.25
    with pytest.raises(TypeError, match=r"for the plan it returned Tensor of shape \(2,\)"):
        metric_number(torch.ones(2), "eval_fn", "the plan")
    with pytest.raises(TypeError, match="it returned bool True"):
        metric_number(True, "eval_fn", "the plan")
    with pytest.raises(ValueError, match="eval_fn returned inf for the plan"):
        metric_number(float("inf"), "eval_fn", "the plan")
    assert math.isnan(metric_number(float("nan"), "val_fn", "epoch 1", finite=False))
