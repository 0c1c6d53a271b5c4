"""graph_quantizers/edges.py, rules 3 and 4 of graph placement: quantize_joins quantizes the
inputs and output of a residual add; quantize_fully_integer, on a fully integer target, every
activation edge between integer ops."""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import nn
from toys import gen, quantize_case, run_item  # tests/toys.py

import edgequant as eq
from edgequant.functional import sqnr_db
from edgequant.quantizer import quantizers


def test_residual_model_becomes_a_graph_module_with_output_quantizers() -> None:
    model, calib, test = quantize_case("residual")
    qmodel = eq.quantize(model, "w8a8", calib)
    assert isinstance(qmodel, torch.fx.GraphModule)
    summary = qmodel.quant_summary
    assert [r.name for r in summary.layers if r.output == "quantized"] == ["conv2"]
    assert "output quantized" in summary.format()
    output_quantizers = [q for q in quantizers(qmodel) if q.name.endswith(".output")]
    assert len(output_quantizers) == 2  # conv2's output and the residual join
    assert all(q.mode == "quantize" and q.calibrated for q in output_quantizers)
    # The join's quantizer really quantizes: the tensor after the add sits on its grid.
    join = qmodel.get_submodule("output_quantizers.join_add")
    seen: list[torch.Tensor] = []
    handle = join.register_forward_hook(lambda m, i, o: seen.append(o))
    run_item(qmodel, test)
    handle.remove()
    steps = seen[0] / join.scale + join.zero_point
    assert float((steps - steps.round()).abs().max()) < 1e-3
    assert sqnr_db(run_item(model, test), run_item(qmodel, test)) > 30.0


class _TwoBranches(nn.Module):
    """Two convs joined by a concatenation, then average pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch_F.relu(self.a(x)), torch_F.relu(self.b(x))], 1)
        return self.fc(torch.flatten(torch_F.adaptive_avg_pool2d(h, 1), 1))


def test_a_fully_integer_target_quantizes_every_edge_between_integer_ops() -> None:
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 6, 6, generator=gen(i)) for i in range(2)]
    recipe = eq.Recipe.preset("w8a8").replace(target="mcu-int8")
    qmodel = eq.quantize(_TwoBranches().eval(), recipe, calib)
    placed = sorted(dict(qmodel.get_submodule("output_quantizers").named_children()))
    assert "edge_cat" in placed and "edge_adaptive_avg_pool2d" in placed
    assert any("is fully integer" in note for note in qmodel.quant_summary.notes)
    plain = eq.quantize(_TwoBranches().eval(), "w8a8", calib).get_submodule("output_quantizers")
    assert not any(name.startswith("edge_") for name in dict(plain.named_children()))
