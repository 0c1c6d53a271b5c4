"""A quantized model as a PT2E-style `torch.export` program that carries edgequant's own grids.

PyTorch's edge converters (litert-torch for LiteRT / TFLite Micro, ExecuTorch's XNNPACK backend)
read a `torch.export` graph in which every quantized tensor passes through
`quantized_decomposed.quantize_per_tensor` -> `dequantize_per_tensor` (activations) or
`quantize_per_channel` -> `dequantize_per_channel` (weights): the form `convert_pt2e` writes.
Instead of letting a PT2E quantizer calibrate its own scales, this module writes that form from
the runtime-neutral lowering the ONNX exporter uses (`lower`: integer weights, INT32-grid
biases, calibrated activation scales), so every scale, zero point and integer weight of the
simulation reaches the file unchanged.

Grids the edge runtimes cannot run are converted exactly or refused, naming the layer:
- uint8 activations (zero point z in 0..255) become int8 with zero point z - 128: the same grid;
- outlier channel splitting and SmoothQuant scaling stay a gather and a per-channel multiply
  before the input quantizer, as simulated (a float multiply: fully integer formats refuse it);
- activations below 8 bits, asymmetric weights, per-group weights, dynamic quantization and
  embedding tables have no form there and are refused.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant.batches import split_inputs
from edgequant.export.lower import (
    ExportError,
    LoweredEmbedding,
    LoweredLayer,
    LoweredQDQ,
    lower,
    set_submodule,
)
from edgequant.export.selection_conv import selection_convs, upsample_convs
from edgequant.modules import transform_input

INT8_MIN, INT8_MAX = -128, 127


def _decomposed() -> Any:
    """torch.ops.quantized_decomposed, registered on first use (the import is not light)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    return torch.ops.quantized_decomposed


class Pt2eQDQ(nn.Module):
    """An activation quantizer as quantize_per_tensor -> dequantize_per_tensor on int8."""

    def __init__(self, lowered: LoweredQDQ, name: str) -> None:
        super().__init__()
        q: Any = lowered  # its buffers, typed as Tensor | Module by nn.Module
        if q.axis != -1:
            raise ExportError(f"{name}: per-channel activation quantization has no edge form")
        if q.container != 8 or q.qmax - q.qmin != 255:
            raise ExportError(
                f"{name}: {q.qmax - q.qmin + 1}-level activations; edge int8 runtimes run "
                "8-bit activations only (use 8-bit activations, e.g. the w4a8 or w8a8 preset)"
            )
        zero_point = int(q.zero_point.reshape(()).item())
        if q.zero_point.dtype == torch.uint8:
            zero_point -= 128  # the same grid, shifted: TFLite and XNNPACK take int8 only
        self.scale = float(q.scale.reshape(()).item())
        self.zero_point = zero_point

    def forward(self, x: Tensor) -> Tensor:
        qd = _decomposed()
        q = qd.quantize_per_tensor.default(
            x, self.scale, self.zero_point, INT8_MIN, INT8_MAX, torch.int8
        )
        return qd.dequantize_per_tensor.default(
            q, self.scale, self.zero_point, INT8_MIN, INT8_MAX, torch.int8
        )


class Pt2eLayer(nn.Module):
    """A quantized Conv1d/Conv2d/Linear: int8 input, int8 symmetric weights (per tensor or per
    output channel), the bias on the INT32 grid of input scale x weight scale (as a float the
    converters quantize back to the same integers)."""

    weight: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor
    bias: Tensor | None
    channel_index: Tensor | None
    smooth_inv: Tensor | None

    def __init__(self, lowered: LoweredLayer, int8_weight: bool = False) -> None:
        super().__init__()
        self.int8_weight = int8_weight
        layer: Any = lowered  # its buffers, typed as Tensor | Module by nn.Module
        name = layer.name
        if layer.dynamic:
            raise ExportError(f"layer {name!r}: dynamic quantization has no integer edge form")
        if layer.weight_float:
            raise ExportError(
                f"layer {name!r}: its weight is not quantized (a float island in an integer "
                "model); quantize it or leave the layer out of the model"
            )
        if layer.w_block or layer.w_axis not in (-1, 0) or not layer.w_zero:
            raise ExportError(
                f"layer {name!r}: edge runtimes take symmetric per-tensor or per-output-channel "
                "weights (use the mcu-int8 or executorch target)"
            )
        if layer.input_quantizer is None:
            raise ExportError(f"layer {name!r}: its input is not quantized (a float island)")
        self.name = name
        self.kind = layer.kind
        self.conv_args = getattr(layer, "conv_args", None)
        self.pad = getattr(layer, "pad", None)
        self.shared_input = layer.shared_input
        # Named as in the quantized layer: a traced graph may call `<layer>.input_quantizer`.
        self.input_quantizer = Pt2eQDQ(layer.input_quantizer, f"layer {name!r} input")
        w_q = layer.weight_q.to(torch.int8)  # 4-bit weights travel in int8 containers
        self.per_channel = layer.w_axis == 0
        scale = layer.weight_scale.detach().float()
        shape = [-1] + [1] * (w_q.dim() - 1)
        # int8_weight: the int8 tensor itself, dequantized (convert_pt2e's form: ExecuTorch reads
        # it); else floats that the graph quantizes (litert-torch folds that into an int8
        # tensor): quantize_per_channel of q * s gives q back exactly, (q * s) / s rounds to q.
        self.register_buffer(
            "weight",
            w_q.clone()
            if int8_weight
            else w_q.float() * (scale.reshape(shape) if self.per_channel else scale),
        )
        self.register_buffer("weight_scale", scale.reshape(-1).clone())
        self.register_buffer("weight_zero_point", torch.zeros(scale.numel(), dtype=torch.int64))
        bias: Tensor | None = None
        if layer.integer_pattern and layer.bias_int is not None:
            bias = layer.bias_int.reshape(-1)
        elif layer.bias_quantized:
            bias = layer.bias_q.double() * layer.bias_scale.double()
        elif layer.has_bias:
            bias = layer.bias
        self.register_buffer("bias", bias.detach().float().clone() if bias is not None else None)
        # Outlier channel splitting and SmoothQuant scaling before the input quantizer, as in the
        # simulation: a gather and a per-channel multiply (float: fully integer formats refuse
        # the multiply when they find it in the converted file).
        index, smooth = layer.input_channel_index, layer.input_smooth_inv
        self.register_buffer("channel_index", index.clone() if index is not None else None)
        self.register_buffer("smooth_inv", smooth.clone() if smooth is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        qd = _decomposed()
        x = transform_input(x, self.channel_index, self.smooth_inv)
        if not self.shared_input:
            x = self.input_quantizer(x)
        if self.per_channel:
            w = self.weight
            if not self.int8_weight:
                w = qd.quantize_per_channel.default(
                    w, self.weight_scale, self.weight_zero_point, 0, -127, 127, torch.int8
                )
            w = qd.dequantize_per_channel.default(
                w, self.weight_scale, self.weight_zero_point, 0, -127, 127, torch.int8
            )
        else:
            s = float(self.weight_scale.item())
            w = self.weight
            if not self.int8_weight:
                w = qd.quantize_per_tensor.default(w, s, 0, -127, 127, torch.int8)
            w = qd.dequantize_per_tensor.default(w, s, 0, -127, 127, torch.int8)
        if self.kind == "linear":
            return torch_F.linear(x, w, self.bias)
        if self.pad is not None:
            x = torch_F.pad(x, self.pad[0], mode=self.pad[1])
        conv = torch_F.conv1d if self.kind == "conv1d" else torch_F.conv2d
        assert self.conv_args is not None
        return conv(x, w, self.bias, **self.conv_args)


def pt2e_model(qmodel: nn.Module, int8_weights: bool = False) -> nn.Module:
    """A copy of qmodel whose quantizers and quantized layers are PT2E quantize/dequantize pairs
    on edgequant's own grids (ExportError naming the layer whose grid has no edge form).

    int8_weights: weights stored as int8 tensors (ExecuTorch) instead of floats on the grid that
    the graph quantizes (litert-torch, which folds them into int8 tensors itself)."""
    lowered = lower(qmodel, weight_storage="int8")
    for name, m in list(lowered.named_modules()):
        if isinstance(m, LoweredEmbedding):
            raise ExportError(f"layer {name!r}: quantized embedding tables have no edge form")
        if isinstance(m, LoweredLayer):
            set_submodule(lowered, name, Pt2eLayer(m, int8_weights))
    for name, m in list(lowered.named_modules()):
        if isinstance(m, LoweredQDQ):
            set_submodule(lowered, name, Pt2eQDQ(m, f"quantizer {name!r}"))
    return lowered.eval()


def export_program(
    model: nn.Module, example_inputs: Any, int8_weights: bool = False, concat_grid: bool = False
) -> torch.export.ExportedProgram:
    """torch.export of the PT2E model (static shapes: edge runtimes plan memory for one), its
    strided subsampling / zero channel padding of quantized tensors written as exact 1x1
    convolutions (export/selection_conv.py; int8_weights as in pt2e_model), values nothing
    reads dropped. concat_grid: XNNPACK's form: every concatenation's inputs requantized onto its
    output grid (litert-torch's converter puts them there itself, and refuses the pairs), and
    nearest upsampling of a quantized tensor written as an exact transposed convolution
    (XNNPACK has none; litert-torch writes RESIZE_NEAREST_NEIGHBOR)."""
    import warnings

    args, kwargs = split_inputs(example_inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(model, args, kwargs=kwargs or None)
            module = program.module()
            if isinstance(module, torch.fx.GraphModule):
                rewritten = adaptive_max_pools_as_windows(module)
                rewritten += selection_convs(module, int8_weights)
                if concat_grid:
                    rewritten += upsample_convs(module, int8_weights)
                    rewritten += concat_inputs_on_output_grid(module)
                    rewritten += dequantize_per_reader(module)
                    rewritten += float_weights_for_float_outputs(module)
                # Tensors of zeros whose only use was their shape (a concatenation with zeros
                # written as F.pad) are left without readers: the converters must not see them.
                if module.graph.eliminate_dead_code():
                    module.recompile()
                    rewritten += 1
                if rewritten:
                    program = torch.export.export(module, args, kwargs=kwargs or None)
            return program
        except Exception as err:  # torch.export raises many types; say which stage failed
            raise ExportError(f"torch.export failed: {type(err).__name__}: {err}") from err


_ADAPTIVE_MAX_POOLS = {"adaptive_max_pool1d": "max_pool1d", "adaptive_max_pool2d": "max_pool2d"}


def adaptive_max_pools_as_windows(gm: torch.fx.GraphModule) -> int:
    """Rewrite, in place, every adaptive max pool whose input sizes are whole multiples of its
    output sizes as the max pool of fixed windows it then is (kernel = stride = input // output:
    the same windows, the same values); the number rewritten. Neither converter has an adaptive
    max pool (litert-torch refuses it; it is not in ExecuTorch's core ATen set), and both run
    MAX_POOL_2D / XNNPACK's max pool on the input's grid. Other sizes (uneven windows) and uses
    of the indices are left for the converters to refuse, naming the op."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        op = str(getattr(node.target, "_opname", "")) if node.op == "call_function" else ""
        if op not in _ADAPTIVE_MAX_POOLS or not isinstance(node.args[0], torch.fx.Node):
            continue
        val = node.args[0].meta.get("val")
        sizes = [int(d) for d in val.shape[-len(node.args[1]) :]] if val is not None else []
        outs = [int(o) for o in node.args[1]]
        users = list(node.users)
        if (
            not sizes
            or any(i % o for i, o in zip(sizes, outs, strict=True))
            or not all(u.target is operator.getitem for u in users)
            or any(u.args[1] != 0 and u.users for u in users)  # the indices are read
        ):
            continue
        kernel = [i // o for i, o in zip(sizes, outs, strict=True)]
        pool = getattr(torch.ops.aten, _ADAPTIVE_MAX_POOLS[op]).default
        with gm.graph.inserting_before(node):
            windows = gm.graph.call_function(pool, (node.args[0], kernel))  # stride: kernel
        windows.meta = {k: v for k, v in node.meta.items() if k != "val"}
        for user in users:
            if user.args[1] == 0:
                windows.meta["val"] = user.meta.get("val")
                user.replace_all_uses_with(windows)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def concat_inputs_on_output_grid(gm: torch.fx.GraphModule) -> int:
    """Put every input of a quantized concatenation on the concatenation's output grid with a
    quantize/dequantize pair of that grid (the requantization the integer reference does), in
    place; the number of pairs inserted. TFLite and XNNPACK run a concatenation on one grid for
    its inputs and output: XNNPACK refuses to load a program whose inputs differ."""
    qd = _decomposed()
    quantize, dequantize = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
    inserted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].target != quantize:
            continue
        grid = tuple(users[0].args[1:])
        parts = list(cast(list, node.args[0]))
        for k, part in enumerate(parts):
            if not (
                isinstance(part, torch.fx.Node)
                and part.target == dequantize
                and tuple(part.args[1:]) != grid
            ):
                continue
            with gm.graph.inserting_before(node):
                q = gm.graph.call_function(quantize, (part, *grid))
                parts[k] = gm.graph.call_function(dequantize, (q, *grid))
            inserted += 1
        node.args = (parts, *node.args[1:])
    if inserted:
        gm.recompile()
    return inserted


def dequantize_per_reader(gm: torch.fx.GraphModule) -> int:
    """Give every reader of a dequantized activation its own dequantize node, in place (the form
    convert_pt2e writes); the number of nodes added. XNNPACK's partitioner groups the ops that
    share a dequantize node into one partition: a skip read by a layer and by a concatenation
    further on would join both into a partition that the ops between them (outside it) both
    read from and write to, and the lowering fails on that cycle."""
    dequantize = _decomposed().dequantize_per_tensor.default
    added = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != dequantize:
            continue
        for user in list(node.users)[1:]:
            with gm.graph.inserting_before(user):
                copy = gm.graph.call_function(dequantize, node.args, dict(node.kwargs))
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
            added += 1
    if added:
        gm.recompile()
    return added


_ACTIVATIONS = {
    torch.ops.aten.relu.default,
    torch.ops.aten.relu_.default,
    torch.ops.aten.relu6.default,
    torch.ops.aten.hardtanh.default,
    torch.ops.aten.clamp.default,
}


def float_weights_for_float_outputs(gm: torch.fx.GraphModule) -> int:
    """A convolution whose output is not quantized (a model's last conv, left float by a target
    that keeps the outputs float) gets its weight as the float tensor it dequantizes to (the
    simulation's weight, exactly), in place, and runs as a float conv in XNNPACK; the number
    changed. XNNPACK takes no int8-weight conv with a float output: it ran outside the
    delegate, and ExecuTorch 1.5.1 computed it wrongly there (SQNR 2.4 dB on a conv-conv
    model). Linear layers with a float output are delegated and left as they are."""
    dequantize = _decomposed().dequantize_per_channel.default
    quantize = _decomposed().quantize_per_tensor.default
    layers = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default)
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in layers or len(node.args) < 2:
            continue
        weight = node.args[1]
        out = node
        while len(out.users) == 1 and next(iter(out.users)).target in _ACTIVATIONS:
            out = next(iter(out.users))  # a ReLU or clamp before the output quantizer
        if all(u.target == quantize for u in out.users) or not (
            isinstance(weight, torch.fx.Node)
            and weight.target == dequantize
            and all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in weight.args[:3])
        ):
            continue
        attrs = [str(cast(torch.fx.Node, a).target) for a in weight.args[:3]]
        w, s, z = (gm.get_buffer(a) for a in attrs)
        with torch.no_grad():
            value = dequantize(w, s, z, *weight.args[3:])
        name = attrs[0].replace(".", "_") + "_float"
        gm.register_buffer(name, value)
        with gm.graph.inserting_before(node):
            node.replace_input_with(weight, gm.graph.get_attr(name))
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def node_layer(node: Any) -> str:
    """The module path a node of an exported graph came from ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def node_op(node: Any) -> str:
    """'aten.conv2d' for a call of torch.ops.aten.conv2d.default ('' for a non-call)."""
    if node.op != "call_function":
        return ""
    target = node.target
    name = getattr(target, "__name__", str(target))
    op = getattr(target, "_opname", None)
    ns = getattr(target, "namespace", None)
    return f"{ns}.{op}" if ns and op else name


def describe_node(node: Any) -> str:
    layer = node_layer(node)
    return f"{node_op(node)} ({'layer ' + repr(layer) if layer else 'the top level'})"


def unsupported_nodes(program: torch.export.ExportedProgram, supported: Iterable[str]) -> list[str]:
    """'op (layer)' for every call in the program whose op is not in `supported` (names like
    'aten.conv2d'), in graph order."""
    allowed = set(supported)
    return [
        describe_node(n)
        for n in program.graph.nodes
        if n.op == "call_function"
        and node_op(n) not in allowed
        and getattr(n.target, "__name__", str(n.target)) not in allowed
    ]


def nodes_of(program: torch.export.ExportedProgram, ops: Iterable[str]) -> list[str]:
    """'op (layer)' for every call in the program of one of `ops`, in graph order."""
    wanted = set(ops)
    return [describe_node(n) for n in program.graph.nodes if node_op(n) in wanted]
