"""The record of what instrumentation did to each layer (model.quant_summary), and the model's
quant_info beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class LayerRecord:
    name: str
    type: str
    quantized: bool
    weight: str = "float"
    activation: str = "float"
    reason: str = ""
    bn_folded: str = ""
    output: str = "float"


@dataclass
class Summary:
    """What instrumentation did to each layer."""

    recipe: str
    method: str
    layers: list[LayerRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The recipe's hardware target (targets.TARGETS): place_graph_quantizers reads its rules.
    target: str = "onnxruntime"

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.quantized]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.quantized]

    def format(self) -> str:
        lines = [
            f"{self.method} quantization with recipe {self.recipe!r}: "
            f"{len(self.quantized)} layers quantized, {len(self.skipped)} kept in float"
        ]
        width = max((len(r.name) for r in self.layers), default=10)
        for r in self.layers:
            if r.quantized:
                bn = f"  (+{r.bn_folded} folded)" if r.bn_folded else ""
                out = "  output quantized" if r.output != "float" else ""
                lines.append(
                    f"  {r.name:<{width}}  {r.type:<8} W {r.weight:<32} A {r.activation}{bn}{out}"
                )
            else:
                lines.append(f"  {r.name:<{width}}  {r.type:<8} float: {r.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    __str__ = format

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "method": self.method,
            "target": self.target,
            "layers": [r.__dict__ for r in self.layers],
            "notes": list(self.notes),
        }


def attach_info(model: nn.Module, summary: Summary, info: dict[str, Any]) -> None:
    """Set `model.quant_summary` and `model.quant_info`. They are plain attributes, which
    nn.Module.__setattr__ stores as any object does, but its annotation admits only tensors and
    modules: hence setattr."""
    attrs: dict[str, Any] = {"quant_summary": summary, "quant_info": info}
    for name, value in attrs.items():
        setattr(model, name, value)
