"""A quantized decoder's Linear layers as ONNX Runtime's MatMulNBits (com.microsoft), written
from the quantizers' own integer codes and scales: 4-bit containers for <= 4 bits (INT3/INT2 codes
sit in INT4 containers). Which Linears have such a form, and its block, is functional.nbits_form,
the rule by which the weight-only PTQ chooses the layers whose inputs it rounds to int8 per block;
a layer without one is a ValueError naming it and the reason. A layer whose simulation rounds
its input to int8 per block (QuantMixin.input_block_int8, ptq/weight_only.py block_int8_rule) is
written with accuracy_level=4, ONNX Runtime's int8 path, which computes that rounding. Without
it, an 8-bit layer (lm_head) keeps its 8-bit codes in the file but is written as a float MatMul
on them, dequantized by constant ops that ONNX Runtime folds when it loads the file: its CPU
MatMulNBits has no fast 8-bit kernel for float inputs (it unpacks the whole weight on every
call). A per-output-channel grid is written as blocks whose scales repeat the channel's scale
(MatMulNBits takes power-of-two blocks; 576 is not one). An 8-bit per-row embedding is a Gather of
the integer table and its scales; a tied lm_head reads the same initializers (one table in the
file). Used by export/lm.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.export.lm_graph import set_nodes
from edgequant.modules import QuantMixin

__all__ = ["LMExportError", "pack_linear", "rewrite_decoder"]


class LMExportError(RuntimeError):
    """The exported language model does not compute what the simulation computes."""


@dataclass
class _Packed:
    data: np.ndarray  # uint8 (N, blocks, blob)
    scales: np.ndarray  # float32 (N, blocks)
    zero_points: np.ndarray | None  # uint8, packed as MatMulNBits reads them
    bits: int
    block: int
    k: int
    n: int
    # accuracy_level=4: the simulation rounds the layer's input to int8 per block as ONNX
    # Runtime's int8 path does (QuantMixin.input_block_int8).
    int8_inputs: bool = False


def pack_linear(layer: QuantMixin, name: str) -> _Packed:
    """A quantized Linear's integer codes and scales in MatMulNBits' layout; ValueError naming
    the layer and the reason (functional.nbits_form_missing) where it has no such form."""
    wq = layer.weight_quantizer
    assert wq is not None
    spec = wq.spec
    w = cast(Tensor, layer.weight).detach()
    n, k = w.shape
    # functional.nbits_form: the rule by which the weight-only PTQ chose the layers that round
    # their inputs to int8 per block.
    block = F.nbits_form(spec, k)
    if block is None:
        raise ValueError(
            f"layer {name!r} ({k} inputs, {spec.short()}) has no MatMulNBits form: "
            f"{F.nbits_form_missing(spec, k)}"
        )
    group = spec.group_size  # None per output channel
    q = F.quantize(w, wq.scale, wq.zero_point, spec.qmin, spec.qmax, wq.axis, spec.group_size)
    container = 4 if spec.bits <= 4 else 8
    offset = 2 ** (container - 1) if spec.signed else 0
    blocks = k // block
    if group is None:
        scales = wq.scale.float().reshape(n, 1).expand(n, blocks)
        zps = wq.zero_point.reshape(n, 1).expand(n, blocks)
    else:
        scales = wq.scale.float().reshape(n, blocks)
        zps = wq.zero_point.reshape(n, blocks)
    codes = (q + offset).to(torch.uint8).reshape(n, blocks, block).numpy()
    zp_u = (zps.to(torch.int32) + offset).to(torch.uint8).numpy()
    default = 2 ** (container - 1)
    if container == 4:
        data = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    else:
        data = codes.astype(np.uint8)
    zero_points = None
    if (zp_u != default).any():
        if container == 4:
            padded = np.full((n, blocks + blocks % 2), default, dtype=np.uint8)
            padded[:, :blocks] = zp_u
            zero_points = (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)
        else:
            zero_points = zp_u.copy()
    int8_block = getattr(layer, "input_block_int8", None)
    if int8_block is not None and int(int8_block) != block:
        raise ValueError(
            f"layer {name!r}: its input is rounded to int8 in blocks of {int(int8_block)}, but "
            f"its MatMulNBits blocks are {block}: ONNX Runtime's accuracy_level=4 rounds the "
            "input in the weight's blocks"
        )
    return _Packed(
        data,
        scales.contiguous().numpy().astype(np.float32),
        zero_points,
        container,
        block,
        k,
        n,
        int8_block is not None,
    )


def rewrite_decoder(
    onnx_model: Any, linear_names: dict[str, str], qmodel: nn.Module, notes: list[str]
) -> tuple[int, bool, bool]:
    """MatMul on a quantized weight -> MatMulNBits; the quantized embedding's Gather -> a Gather
    of codes and scales. Returns (MatMulNBits count, embedding quantized, one shared table)."""
    from onnx import helper

    graph = onnx_model.graph
    packed = _packed_layers(linear_names, qmodel)
    new_nodes, replaced = _matmuls_to_nbits(graph, linear_names, packed, notes)
    missing = set(packed) - replaced
    if missing:
        raise LMExportError(
            "no MatMul on the weights of "
            + ", ".join(sorted(linear_names[k] for k in missing))
            + " in the exported graph (the exporter changed their form)"
        )
    quant_embed, shared = _quantized_embedding(
        graph, linear_names, qmodel, packed, new_nodes, notes
    )
    set_nodes(graph, new_nodes)
    if not any(o.domain == "com.microsoft" for o in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(n.op_type == "MatMulNBits" for n in new_nodes), quant_embed, shared


def _packed_layers(linear_names: dict[str, str], qmodel: nn.Module) -> dict[str, _Packed]:
    """The packed weights of every quantized Linear, by the name of its weight in the graph."""
    packed: dict[str, _Packed] = {}
    for key, name in linear_names.items():
        layer = qmodel.get_submodule(name)
        wq = getattr(layer, "weight_quantizer", None)
        if wq is not None and wq.mode == "quantize":
            packed[key] = pack_linear(cast(QuantMixin, layer), name)
    return packed


def _matmuls_to_nbits(
    graph: Any, linear_names: dict[str, str], packed: dict[str, _Packed], notes: list[str]
) -> tuple[list[Any], set[str]]:
    """The graph's nodes with each MatMul on a packed weight replaced by MatMulNBits (its codes,
    scales and zero points added as initializers); and the weights replaced."""
    from onnx import helper, numpy_helper

    inits = {i.name for i in graph.initializer}
    new_nodes = []
    replaced: set[str] = set()
    for node in graph.node:
        if not (node.op_type == "MatMul" and node.input[1] in packed):
            new_nodes.append(node)
            continue
        key = node.input[1]
        p = packed[key]
        name = linear_names[key]
        data_name, scale_name = f"{name}.qweight", f"{name}.scales"
        if data_name not in inits:
            graph.initializer.append(numpy_helper.from_array(p.data, data_name))
            graph.initializer.append(numpy_helper.from_array(p.scales.reshape(-1), scale_name))
            inits.add(data_name)
        replaced.add(key)
        if p.bits == 8 and not p.int8_inputs:
            new_nodes.extend(_dequantized_matmul(graph, node, p, name, data_name, scale_name))
            notes.append(
                f"{name}: 8-bit codes in the file, run as a float MatMul on them (ONNX Runtime "
                "folds the dequantization when it loads the file)"
            )
            continue
        inputs = [node.input[0], data_name, scale_name]
        if p.zero_points is not None:
            zp_name = f"{name}.zero_points"
            graph.initializer.append(numpy_helper.from_array(p.zero_points, zp_name))
            inputs.append(zp_name)
        level: dict[str, Any] = {"accuracy_level": 4} if p.int8_inputs else {}
        new_nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                list(node.output),
                name=f"{name}/MatMulNBits",
                domain="com.microsoft",
                K=p.k,
                N=p.n,
                bits=p.bits,
                block_size=p.block,
                **level,
            )
        )
    return new_nodes, replaced


def _dequantized_matmul(
    graph: Any, node: Any, p: _Packed, name: str, data: str, scales: str
) -> list[Any]:
    """MatMul(x, W^T) with W = (codes - zero point) x scale computed from the 8-bit codes and
    scales in MatMulNBits' layout (N, blocks, block): constant ops only, so ONNX Runtime folds
    them into one float weight when it loads the file; the file keeps the 8-bit codes."""
    from onnx import TensorProto, helper, numpy_helper

    blocks = p.data.shape[1]
    centre = (
        p.zero_points.astype(np.float32).reshape(p.n, blocks, 1)
        if p.zero_points is not None
        else np.array([128.0], np.float32)
    )
    graph.initializer.append(numpy_helper.from_array(centre, f"{name}.centre"))
    graph.initializer.append(
        numpy_helper.from_array(np.array([p.n, blocks, 1], np.int64), f"{name}.scale_blocks")
    )
    graph.initializer.append(
        numpy_helper.from_array(np.array([p.n, p.k], np.int64), f"{name}.weight_shape")
    )
    t = f"{name}/dequantized"
    return [
        helper.make_node("Cast", [data], [f"{t}.codes"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{t}.codes", f"{name}.centre"], [f"{t}.centred"]),
        helper.make_node("Reshape", [scales, f"{name}.scale_blocks"], [f"{t}.scales"]),
        helper.make_node("Mul", [f"{t}.centred", f"{t}.scales"], [f"{t}.blocks"]),
        helper.make_node("Reshape", [f"{t}.blocks", f"{name}.weight_shape"], [f"{t}.weight"]),
        helper.make_node("Transpose", [f"{t}.weight"], [f"{t}.weight_t"], perm=[1, 0]),
        helper.make_node(
            "MatMul", [node.input[0], f"{t}.weight_t"], list(node.output), name=f"{name}/MatMul"
        ),
    ]


def _quantized_embedding(
    graph: Any,
    linear_names: dict[str, str],
    qmodel: nn.Module,
    packed: dict[str, _Packed],
    new_nodes: list[Any],
    notes: list[str],
) -> tuple[bool, bool]:
    """An 8-bit per-row embedding becomes, in `new_nodes`, a Gather of its codes and of its row
    scales (the tied lm_head's table when it is the same). Returns (quantized, shared)."""
    embed_layer = qmodel.get_submodule("model.embed_tokens")
    ewq = getattr(embed_layer, "weight_quantizer", None)
    if ewq is None or ewq.mode != "quantize":
        return False, False
    spec = ewq.spec
    if not (spec.granularity == "channel" and ewq.axis == 0 and spec.bits == 8 and spec.symmetric):
        raise ValueError(
            f"model.embed_tokens: {spec.short()} has no export here (8-bit symmetric per-row "
            "embeddings only)"
        )
    head = qmodel.get_submodule("lm_head")
    head_key = {n: k for k, n in linear_names.items()}["lm_head"]
    shared = (
        getattr(head, "weight", None) is embed_layer.weight
        and head_key in packed
        and packed[head_key].bits == 8
        and bool(torch.equal(cast(Any, head).weight_quantizer.scale, ewq.scale))
    )
    if shared:
        table, scale_rows = _shared_table(graph, packed[head_key], new_nodes)
        notes.append("lm_head and model.embed_tokens are tied: one 8-bit table in the file")
    else:
        table, scale_rows = _own_table(graph, embed_layer, ewq)
    gathers = [n for n in new_nodes if n.op_type == "Gather" and n.input[0] == "embed"]
    if len(gathers) != 1:
        raise LMExportError(f"expected one Gather on the embedding table, found {len(gathers)}")
    index = new_nodes.index(gathers[0])
    new_nodes[index : index + 1] = _gather_rows(graph, gathers[0], table, scale_rows)
    return True, shared


def _shared_table(graph: Any, p: _Packed, new_nodes: list[Any]) -> tuple[str, str]:
    """The tied lm_head's codes as the embedding table; its scales reshaped to rows x blocks."""
    from onnx import helper, numpy_helper

    blocks = p.data.shape[1]
    graph.initializer.append(
        numpy_helper.from_array(np.array([p.n, blocks], dtype=np.int64), "embed.scale_shape")
    )
    new_nodes.insert(
        0,
        helper.make_node("Reshape", ["lm_head.scales", "embed.scale_shape"], ["embed.scale_rows"]),
    )
    return "lm_head.qweight", "embed.scale_rows"


def _own_table(graph: Any, embed_layer: nn.Module, ewq: Any) -> tuple[str, str]:
    """The embedding's own 8-bit codes (offset to uint8) and row scales, as initializers."""
    from onnx import numpy_helper

    spec = ewq.spec
    w = cast(Tensor, embed_layer.weight).detach()
    q = F.quantize(w, ewq.scale, ewq.zero_point, spec.qmin, spec.qmax, 0, None)
    v, d = w.shape
    block = F.nbits_form(spec, d)
    if block is None:
        raise ValueError(f"model.embed_tokens: {F.nbits_form_missing(spec, d)}")
    blocks = d // block
    codes = (q + 128).to(torch.uint8).reshape(v, blocks, block).numpy()
    graph.initializer.append(numpy_helper.from_array(codes, "embed.qweight"))
    graph.initializer.append(
        numpy_helper.from_array(
            ewq.scale.float().reshape(v, 1).expand(v, blocks).contiguous().numpy(), "embed.scales"
        )
    )
    return "embed.qweight", "embed.scales"


def _gather_rows(graph: Any, gather: Any, table: str, scale_rows: str) -> list[Any]:
    """The nodes that replace the float embedding's Gather: the rows' codes and scales gathered,
    then (codes - 128) x scale."""
    from onnx import TensorProto, helper, numpy_helper

    ids, out = gather.input[1], gather.output[0]
    for value, name in (
        (np.array([128.0], np.float32), "embed.offset"),
        (np.array([-1], np.int64), "embed.last_axis"),
        (np.array([0, 0, -1], np.int64), "embed.flat_shape"),
    ):
        graph.initializer.append(numpy_helper.from_array(value, name))
    return [
        helper.make_node("Gather", [table, ids], ["embed.codes"], axis=0),
        helper.make_node("Cast", ["embed.codes"], ["embed.codes_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["embed.codes_f", "embed.offset"], ["embed.centered"]),
        helper.make_node("Gather", [scale_rows, ids], ["embed.row_scales"], axis=0),
        helper.make_node("Unsqueeze", ["embed.row_scales", "embed.last_axis"], ["embed.s4"]),
        helper.make_node("Mul", ["embed.centered", "embed.s4"], ["embed.blocks"]),
        helper.make_node("Reshape", ["embed.blocks", "embed.flat_shape"], [out]),
    ]
