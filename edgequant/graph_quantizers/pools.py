"""An adaptive max pool whose input sizes are whole multiples of its output sizes is a max pool
of fixed windows (kernel = stride = input // output): the traced graph calls it so, and every
export writes a MaxPool (ONNX), MAX_POOL_2D (TFLite) or XNNPACK's max pool on the input's grid.
`F.adaptive_max_pool1d(x, 1)` would otherwise reach ONNX as Unsqueeze -> ReduceMax -> Squeeze,
which no fully integer export takes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.check.ops import ADAPTIVE_MAX_POOL_FUNCTIONS, ADAPTIVE_MAX_POOL_MODULES, pool_windows

_FUNCTIONS = ADAPTIVE_MAX_POOL_FUNCTIONS
_MODULES = ADAPTIVE_MAX_POOL_MODULES


def window_max_pool(x: torch.Tensor, output_size: Any, spatial: int) -> torch.Tensor:
    """F.adaptive_max_pool{spatial}d(x, output_size): as the max pool of fixed windows where
    every input size is a whole multiple of its output size (None: the input's size)."""
    kernel = pool_windows([int(s) for s in x.shape[-spatial:]], output_size)
    if kernel is None:  # uneven windows: eq.check and eq.quantize refuse them for edge targets
        adaptive = F.adaptive_max_pool1d if spatial == 1 else F.adaptive_max_pool2d
        return adaptive(x, output_size)
    return F.max_pool1d(x, kernel) if spatial == 1 else F.max_pool2d(x, kernel)


class WindowMaxPool(nn.Module):
    """An adaptive max pool module that runs as window_max_pool (keeps the module's path in the
    graph: refusals name the layer)."""

    def __init__(self, output_size: Any, spatial: int) -> None:
        super().__init__()
        self.output_size, self.spatial = output_size, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_max_pool(x, self.output_size, self.spatial)


def adaptive_max_pools_as_windows(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> int:
    """Call window_max_pool in place of every adaptive max pool of gm (function or module) that
    does not return indices; the number rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            path = str(node.target)
            m = modules.get(path)
            if m is not None and type(m) in _MODULES and not getattr(m, "return_indices", False):
                modules[path] = WindowMaxPool(getattr(m, "output_size", None), _MODULES[type(m)])
                gm.set_submodule(path, modules[path])
                count += 1
            continue
        if node.op != "call_function" or node.target not in _FUNCTIONS:
            continue
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if node.kwargs.get("return_indices") or len(node.args) > 2 or not node.args:
            continue
        if isinstance(size, torch.fx.Node):
            continue
        with gm.graph.inserting_before(node):
            args = (node.args[0], size, _FUNCTIONS[node.target])
            windows = gm.graph.call_function(window_max_pool, args)
        node.replace_all_uses_with(windows)
        gm.graph.erase_node(node)
        count += 1
    return count
