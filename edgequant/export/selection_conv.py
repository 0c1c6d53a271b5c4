"""Strided subsampling and zero channel padding of a quantized tensor, as one 1x1 convolution.

The option-A shortcut of CIFAR ResNets (`F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`, or a
`torch.cat` with zeros, or a 1x1 max / average pool of stride 2) is pure selection: every output
value is an input value or zero. Edge runtimes run it badly as written: LiteRT keeps its
STRIDED_SLICE / PAD with TRANSPOSEs around them (NCHW slicing in an NHWC graph), and ExecuTorch
1.5.1's XNNPACK program computes wrong outputs when the sliced tensor also feeds a stride-2
convolution. Written instead as a 1x1 convolution of the same strides whose int8 weight is a
selection matrix (1 where output channel o copies input channel c, 0 elsewhere; weight scale
1.0, no bias) and whose output grid is the input's, it is exact in integer arithmetic: the
accumulator is q - z_in, the multiplier s * 1.0 / s is exactly 1, so the output is q again, and
a padded channel gives the zero point (real 0). Both runtimes delegate the convolution.

The rewrite works on the aten graph of a `torch.export` program in PT2E form: a chain of
selection ops (slices starting at 0 with any step, channel slices, constant zero padding of
channels, concatenation with zeros along channels, kernel-1 pools without padding, and
quantize/dequantize pairs on the source's own grid) that starts at a dequantized activation and
subsamples at least one spatial dimension or pads channels with zeros (ExecuTorch's XNNPACK
delegate does not take a constant pad). Anything else is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

INT8_MIN, INT8_MAX = -128, 127

_ZERO_MAKERS = frozenset({"zeros", "zeros_like", "new_zeros"})
_FULL_MAKERS = frozenset({"full", "full_like", "new_full"})
_TRANSPARENT = frozenset({"clone", "alias", "contiguous"})


def _op(node: fx.Node) -> str:
    """The aten op name of a call ('slice' for aten.slice.Tensor), '' for anything else."""
    if node.op != "call_function":
        return ""
    target: Any = node.target
    if getattr(target, "namespace", None) not in ("aten", "quantized_decomposed"):
        return ""
    return str(getattr(target, "_opname", ""))


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(d) for d in val.shape)
    except TypeError:  # symbolic sizes: not a static graph
        return None


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _grid(node: fx.Node) -> tuple[Any, ...]:
    """(scale, zero point, qmin, qmax, dtype) of a per-tensor quantize or dequantize node."""
    return tuple(node.args[1:6])


def _is_zero(node: Any) -> bool:
    """Whether a node makes a tensor of zeros (through quantize/dequantize pairs, which keep 0:
    every grid holds it exactly)."""
    if not isinstance(node, fx.Node):
        return False
    op = _op(node)
    if op in ("quantize_per_tensor", "dequantize_per_tensor") or op in _TRANSPARENT:
        return _is_zero(node.args[0])
    if op in _ZERO_MAKERS:
        return True
    if op in _FULL_MAKERS:
        value = _arg(node, 1 if op in ("full", "full_like") else 2, "fill_value", None)
        return isinstance(value, (int, float)) and value == 0
    return False


def _reads_shape_only(node: fx.Node) -> bool:
    """Whether a node uses its input only for its shape, dtype or device (zeros_like, or a
    slice / view whose every user does): `torch.cat([x, torch.zeros_like(x)], 1)`."""
    op = _op(node)
    if op in _ZERO_MAKERS or op in _FULL_MAKERS:
        return True
    if op in ("slice", "view", "reshape", "expand") or op in _TRANSPARENT:
        return bool(node.users) and all(_reads_shape_only(u) for u in node.users)
    return False


@dataclass
class Selection:
    """What a chain of selection ops did to an (N, C, *spatial) tensor: per spatial dimension
    the step taken from index 0, and for each output channel its input channel (None: zeros)."""

    strides: list[int]
    channels: list[int | None]
    sizes: list[int]  # the current spatial sizes
    end: fx.Node

    def step(self, node: fx.Node, source_grid: tuple[Any, ...]) -> fx.Node | None:
        """Extend the chain by `node` (its input is the chain's end); the new end, or None
        where the node is not a selection of this chain."""
        op = _op(node)
        if op in _TRANSPARENT:
            return node
        if op == "quantize_per_tensor":
            return self._requantize(node, source_grid)
        if op == "slice":
            return self._slice(node)
        if op in ("pad", "constant_pad_nd"):
            return self._pad(node, op)
        if op in ("cat", "concat"):
            return self._cat(node)
        if op in ("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d"):
            return self._pool(node, op)
        return None

    def _requantize(self, node: fx.Node, source_grid: tuple[Any, ...]) -> fx.Node | None:
        """A quantize/dequantize pair on the source's own grid: no value changes."""
        users = list(node.users)
        if _grid(node) != source_grid or len(users) != 1:
            return None
        dq = users[0]
        if _op(dq) != "dequantize_per_tensor" or _grid(dq) != source_grid:
            return None
        return dq

    def _slice(self, node: fx.Node) -> fx.Node | None:
        rank = len(self.sizes) + 2
        dim = int(_arg(node, 1, "dim", 0)) % rank
        start = _arg(node, 2, "start", None) or 0
        end = _arg(node, 3, "end", None)
        step = int(_arg(node, 4, "step", 1))
        if not isinstance(start, int) or (end is not None and not isinstance(end, int)):
            return None
        if dim == 1:
            size = len(self.channels)
            stop = size if end is None else min(end, size)
            self.channels = self.channels[slice(start, stop, step)]
            return node
        if dim < 2 or start != 0 or step < 1:
            return None
        size = self.sizes[dim - 2]
        if end is not None and end < size:
            return None
        self.strides[dim - 2] *= step
        self.sizes[dim - 2] = -(-size // step)
        return node

    def _pad(self, node: fx.Node, op: str) -> fx.Node | None:
        """Zero padding of the channels only."""
        rank = len(self.sizes) + 2
        pads = list(_arg(node, 1, "pad", []))
        value = _arg(node, 3 if op == "pad" else 2, "value", None)
        if op == "pad" and _arg(node, 2, "mode", "constant") != "constant":
            return None
        if value not in (None, 0, 0.0) or len(pads) % 2 or any(p < 0 for p in pads):
            return None
        pairs = [pads[i : i + 2] for i in range(0, len(pads), 2)]  # last dimension first
        channel_pair = rank - 2  # the pair index of dimension 1
        for i, pair in enumerate(pairs):
            if i != channel_pair and any(pair):
                return None
        if len(pairs) > channel_pair:
            left, right = pairs[channel_pair]
            self.channels = [None] * left + self.channels + [None] * right
        return node

    def _cat(self, node: fx.Node) -> fx.Node | None:
        """Concatenation with tensors of zeros along the channels."""
        rank = len(self.sizes) + 2
        tensors: list[Any] = list(_arg(node, 0, "tensors", []))
        dim = int(_arg(node, 1, "dim", 0)) % rank
        if dim != 1 or tensors.count(self.end) != 1:
            return None
        channels: list[int | None] = []
        for t in tensors:
            if t is self.end:
                channels += self.channels
                continue
            shape = _shape(t)
            if not _is_zero(t) or shape is None or len(shape) != rank:
                return None
            channels += [None] * shape[1]
        self.channels = channels
        return node

    def _pool(self, node: fx.Node, op: str) -> fx.Node | None:
        """A kernel-1 pool without padding: a strided subsampling."""
        n = len(self.sizes)
        if op[-2:] != f"{n}d":
            return None
        kernel = _arg(node, 1, "kernel_size", None)
        stride = _arg(node, 2, "stride", None) or kernel
        padding = _arg(node, 3, "padding", 0)
        kernel, stride, padding = (
            list(v) * (n // len(v)) if isinstance(v, (list, tuple)) else [v] * n
            for v in (kernel, stride, padding)
        )
        if any(k != 1 for k in kernel) or any(p != 0 for p in padding):
            return None
        if op.startswith("max"):
            dilation = _arg(node, 4, "dilation", 1)
            if any(d != 1 for d in (dilation if isinstance(dilation, (list, tuple)) else [1])):
                return None
        elif _arg(node, 6, "divisor_override", None) not in (None, 1):
            return None
        for i, s in enumerate(stride):
            self.strides[i] *= int(s)
            self.sizes[i] = -(-self.sizes[i] // int(s))
        return node


def _chain(first: fx.Node, source: fx.Node) -> Selection | None:
    """The longest selection chain from `source` (a dequantize node) through `first`, each link
    its predecessor's only user; None when it neither subsamples a spatial dimension nor pads
    channels with zeros, or its shape disagrees with the graph's."""
    shape = _shape(source)
    if shape is None or len(shape) not in (3, 4):
        return None
    grid = _grid(source)
    sel = Selection(
        strides=[1] * (len(shape) - 2),
        channels=list(range(shape[1])),
        sizes=list(shape[2:]),
        end=source,
    )
    node = first
    best: tuple[fx.Node, list[int], list[int | None], list[int]] | None = None
    while True:
        nxt = sel.step(node, grid)
        if nxt is None:
            break
        sel.end = nxt
        expected = (shape[0], len(sel.channels), *sel.sizes)
        if _shape(nxt) != expected:
            break  # ceil_mode or something this walk did not model: stop before it
        if any(s > 1 for s in sel.strides) or None in sel.channels:
            best = (nxt, list(sel.strides), list(sel.channels), list(sel.sizes))
        users = [u for u in nxt.users if not _reads_shape_only(u)]
        if len(users) != 1:
            break
        node = users[0]
    if best is None:
        return None
    end, strides, channels, sizes = best
    return Selection(strides=strides, channels=channels, sizes=sizes, end=end)


def _weight(channels: list[int | None], in_channels: int, spatial: int) -> torch.Tensor:
    weight = torch.zeros((len(channels), in_channels) + (1,) * spatial, dtype=torch.int8)
    for o, c in enumerate(channels):
        if c is not None:
            weight[(o, c) + (0,) * spatial] = 1
    return weight


def _emit(
    gm: fx.GraphModule,
    source: fx.Node,
    end: fx.Node,
    weight: torch.Tensor,
    transposed: bool,
    conv_args: tuple[Any, ...],
    int8_weights: bool,
) -> None:
    """Replace the uses of `end` by a convolution of `source` (a dequantize node) with the int8
    selection `weight` (scale 1.0 per output channel, no bias; transposed: a transposed
    convolution, whose output channels are weight dimension 1), its output on the source's grid.

    int8_weights: the weight as an int8 tensor dequantized per channel (ExecuTorch's form), else
    as floats quantized per channel in the graph (litert-torch's)."""
    qd = torch.ops.quantized_decomposed
    graph = gm.graph
    axis = 1 if transposed else 0
    index = 0
    while hasattr(gm, f"selection_conv_{index}_weight"):
        index += 1
    prefix = f"selection_conv_{index}"
    gm.register_buffer(f"{prefix}_weight", weight if int8_weights else weight.float())
    gm.register_buffer(f"{prefix}_scale", torch.ones(weight.shape[axis]))
    gm.register_buffer(f"{prefix}_zero_point", torch.zeros(weight.shape[axis], dtype=torch.int64))
    spatial = weight.dim() - 2
    aten = torch.ops.aten
    if transposed:
        conv = [aten.conv_transpose1d.default, aten.conv_transpose2d.input][spatial - 1]
    else:
        conv = [aten.conv1d.default, aten.conv2d.default][spatial - 1]
    with graph.inserting_before(end):
        w: fx.Node = graph.get_attr(f"{prefix}_weight")
        s = graph.get_attr(f"{prefix}_scale")
        z = graph.get_attr(f"{prefix}_zero_point")
        wargs = (s, z, axis, -127, 127, torch.int8)
        if not int8_weights:
            w = graph.call_function(qd.quantize_per_channel.default, (w, *wargs))
        w = graph.call_function(qd.dequantize_per_channel.default, (w, *wargs))
        y = graph.call_function(conv, (source, w, None, *conv_args))
        qargs = _grid(source)
        y = graph.call_function(qd.quantize_per_tensor.default, (y, *qargs))
        y = graph.call_function(qd.dequantize_per_tensor.default, (y, *qargs))
    end.replace_all_uses_with(y)


def _int8_sources(gm: fx.GraphModule) -> list[fx.Node]:
    """The per-tensor int8 dequantize nodes of gm, in graph order."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    return [
        n
        for n in gm.graph.nodes
        if _op(n) == "dequantize_per_tensor" and _grid(n)[-1:] == (torch.int8,)
    ]


def _finish(gm: fx.GraphModule, count: int) -> int:
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def selection_convs(gm: fx.GraphModule, int8_weights: bool) -> int:
    """Rewrite, in place, every selection chain of gm (an unlifted `torch.export` module in
    PT2E form) as a 1x1 convolution on the source's grid; the number rewritten (int8_weights:
    as in _emit)."""
    count = 0
    for source in _int8_sources(gm):
        for first in list(source.users):
            sel = _chain(first, source)
            if sel is None:
                continue
            shape = _shape(source)
            assert shape is not None
            weight = _weight(sel.channels, shape[1], len(shape) - 2)
            _emit(gm, source, sel.end, weight, False, (sel.strides,), int8_weights)
            count += 1
    return _finish(gm, count)


_UPSAMPLES = frozenset({"upsample_nearest1d", "upsample_nearest2d"})


def upsample_convs(gm: fx.GraphModule, int8_weights: bool) -> int:
    """Rewrite, in place, every nearest upsampling of a quantized tensor by whole factors as a
    transposed convolution of kernel = stride = the factors whose int8 weight copies each
    channel (1 on the diagonal, weight scale 1.0), its output on the input's grid: output
    position i reads input i // factor, exactly as nearest upsampling does, and in integer
    arithmetic the multiplier is exactly 1. XNNPACK has no nearest upsampling: ExecuTorch runs
    it outside the delegate, which splits the graph into partitions that depend on each other
    (its lowering fails) or computes it on a float tensor. The number rewritten."""
    count = 0
    for source in _int8_sources(gm):
        for node in list(source.users):
            shape, out = _shape(source), _shape(node)
            if _op(node) not in _UPSAMPLES or shape is None or out is None:
                continue
            sizes = list(zip(shape[2:], out[2:], strict=True))
            factors = [o // i for i, o in sizes]
            if out[:2] != shape[:2] or any(o % i for i, o in sizes):
                continue
            weight = torch.zeros((shape[1], shape[1], *factors), dtype=torch.int8)
            for c in range(shape[1]):
                weight[c, c] = 1
            _emit(gm, source, node, weight, True, (factors,), int8_weights)
            count += 1
    return _finish(gm, count)
