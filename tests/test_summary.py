"""summary.py: what instrumentation records, layer by layer: quantized or kept in float, and why."""

from __future__ import annotations

import torch
from torch import nn
from toys import MLP, EmbedNorm, gen

import edgequant as eq
from edgequant.instrument import instrument
from edgequant.summary import LayerRecord, Summary, attach_info


class OwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scaled = OwnForward(4, 4)
        self.fc = nn.Linear(4, 2)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.scaled(x))


def test_summary_lists_layernorm_as_float_with_a_reason() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 5), generator=gen(4))
    _, summary = instrument(EmbedNorm().eval(), eq.Recipe.preset("w8a8"), ids, "static")
    records = {r.name: r for r in summary.layers}
    assert set(records) == {"emb", "norm", "fc"}
    assert not records["norm"].quantized and records["norm"].type == "LayerNorm"
    assert "no quantized version" in records["norm"].reason
    assert records["fc"].quantized and records["emb"].quantized
    text = summary.format()
    assert "2 layers quantized, 1 kept in float" in text
    assert "norm" in text and "LayerNorm float: no quantized version" in text


def test_summary_reasons_for_subclass_unused_and_skipped_layers() -> None:
    torch.manual_seed(0)
    recipe = eq.Recipe.preset("w8a8").replace(skip=("nothing",))
    _, summary = instrument(Odd().eval(), recipe, torch.randn(2, 4, generator=gen(5)), "static")
    reasons = {r.name: r.reason for r in summary.skipped}
    assert "own forward" in reasons["scaled"]
    assert "never ran" in reasons["unused"]
    assert [r.name for r in summary.quantized] == ["fc"]
    recipe = eq.Recipe.preset("w8a8").replace(skip=("fc2",))
    _, summary = instrument(MLP().eval(), recipe, torch.randn(2, 16, generator=gen(6)), "static")
    assert "skip list" in {r.name: r.reason for r in summary.layers}["fc2"]


def test_a_summary_made_by_hand_formats_and_attaches_as_plain_data() -> None:
    summary = Summary("w8a8", "static", target="mcu-int8")
    summary.layers += [
        LayerRecord("conv", "Conv2d", True, "int8", "uint8", bn_folded="bn", output="quantized"),
        LayerRecord("norm", "LayerNorm", False, reason="no quantized version"),
    ]
    summary.notes.append("a note")
    assert [r.name for r in summary.quantized] == ["conv"]
    assert [r.name for r in summary.skipped] == ["norm"]
    lines = summary.format().splitlines()
    assert lines[0] == "static quantization with recipe 'w8a8': 1 layers quantized, 1 kept in float"
    assert "(+bn folded)" in lines[1] and "output quantized" in lines[1]
    assert lines[2].endswith("float: no quantized version") and lines[3] == "  note: a note"
    assert summary.to_dict()["target"] == "mcu-int8"
    model = nn.Linear(2, 2)
    attach_info(model, summary, {"method": "static"})
    assert model.quant_summary is summary and model.quant_info == {"method": "static"}
