"""graph_quantizers/ops.py: how graph placement reads an fx graph (ReLUs, activations a fully
integer runtime folds, data movement, averages, joins) and where a layer's output is quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.graph_quantizers.ops import edge_kind, is_activation, is_relu, output_tail


class Ops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        z = F.pad(h, (1, 1, 1, 1))
        e = F.pad(h, (1, 1, 1, 1), value=1.0)
        c = torch.clamp(h, 0.0, 6.0).clamp(min=y.mean())  # the second bound is a tensor
        s = torch.cat([z, e], 1).mean((2, 3))
        return torch.flatten(self.pool(c), 1) + s[:, :4] + torch.sigmoid(h).sum()


def _graph() -> tuple[dict[str, torch.fx.Node], dict[str, nn.Module]]:
    gm = torch.fx.symbolic_trace(Ops())
    return {n.name: n for n in gm.graph.nodes}, dict(gm.named_modules())


def test_each_node_is_read_as_the_integer_runtime_runs_it() -> None:
    nodes, modules = _graph()
    assert is_relu(nodes["act"], modules) and not is_relu(nodes["clamp"], modules)
    assert is_activation(nodes["clamp"], modules) and not is_activation(nodes["clamp_1"], modules)
    kinds = {name: edge_kind(node, modules) for name, node in nodes.items()}
    assert kinds["act"] == "activation" and kinds["clamp"] == "activation"
    assert kinds["pad"] == "pass" and kinds["pad_1"] is None  # padding with 1 changes values
    assert kinds["cat"] == "concat" and kinds["mean_1"] == "avg" and kinds["pool"] == "avg"
    assert kinds["flatten"] == "pass" and kinds["getitem"] == "pass" and kinds["add"] == "add"
    assert kinds["sigmoid"] is None and kinds["conv"] is None and kinds["clamp_1"] is None


def test_a_layer_output_is_quantized_after_its_relu_or_chain_of_activations() -> None:
    nodes, modules = _graph()
    # conv's only reader is the ReLU; the ReLU has several readers, so the chain stops there.
    assert output_tail(nodes["conv"], modules, fully_integer=False) is nodes["act"]
    assert output_tail(nodes["conv"], modules, fully_integer=True) is nodes["act"]
    # pool's only reader is flatten (no activation): its output is quantized where it is.
    assert output_tail(nodes["pool"], modules, fully_integer=True) is nodes["pool"]
    chain = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.ReLU6()))
    linear, relu, relu6 = list(chain.graph.nodes)[1:4]
    modules = dict(chain.named_modules())
    assert output_tail(linear, modules, fully_integer=False) is relu
    assert output_tail(linear, modules, fully_integer=True) is relu6
