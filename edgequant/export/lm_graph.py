"""The ONNX graph of a `DecoderGraph` (export/lm.py), written node by node with the fused kernels
ONNX Runtime's CPU execution provider runs for a LLaMA decoder step.

A decode step at batch 1 does little arithmetic besides reading the weights, so the time of the
other kernels (and of ONNX Runtime dispatching each one) counts: the graph torch.onnx traced from
the PyTorch statement had about 40 nodes a block (RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul,
rotary embeddings and the causal mask recomputed from shape arithmetic, grouped-query heads
repeated with Expand/Reshape, attention as MatMul/Softmax/MatMul). Here a block is:

    SkipSimplifiedLayerNormalization (the residual add and RMSNorm in one kernel)
    MatMul q, k, v -> GroupQueryAttention (rotary embedding, KV-cache concatenation, causal
    attention over past and new keys, grouped heads; com.microsoft) -> MatMul o
    SkipSimplifiedLayerNormalization -> MatMul gate, up -> Sigmoid, Mul, Mul (SiLU x up) -> MatMul

with the sequence lengths GroupQueryAttention takes computed once a step. Every weight MatMul
reads an initializer named as DecoderGraph's buffer (w__<layer>), and the embedding is a Gather of
"embed", so that export/matmul_nbits.py rewrites the quantized ones alike whatever graph they sit
in. The FP32 reference file is this same graph on float weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["decoder_model", "merge_sibling_matmuls", "set_nodes"]

# Shape(start=, end=) needs opset 15.
MIN_OPSET = 15


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _lengths(nodes: list[Any], helper: Any, TensorProto: Any) -> None:
    """seqlens_k (batch,) int32 = past + tokens - 1 and total_sequence_length (scalar int32)
    = past + tokens, as GroupQueryAttention takes them (no padding inside a batch)."""
    nodes += [
        helper.make_node("Shape", ["input_ids"], ["len/batch"], start=0, end=1),
        helper.make_node("Shape", ["input_ids"], ["len/tokens"], start=1, end=2),
        helper.make_node("Shape", ["past_key_0"], ["len/past"], start=2, end=3),
        helper.make_node("Add", ["len/past", "len/tokens"], ["len/total64"]),
        helper.make_node("Cast", ["len/total64"], ["len/total1"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["len/total1"], ["len/total"]),
        helper.make_node("Sub", ["len/total1", "len/one"], ["len/last"]),
        helper.make_node("Expand", ["len/last", "len/batch"], ["len/seqlens_k"]),
    ]


def _block(nodes: list[Any], helper: Any, g: Any, i: int, x: str, h: str) -> str:
    """Nodes of block i, from its normed input `h` and residual stream `x`; returns the name of
    the MLP's output (the residual add is the next norm's)."""
    pre = f"model.layers.{i}"

    def w(part: str) -> str:
        return "w__" + f"{pre}.{part}".replace(".", "__")

    def mm(a: str, part: str) -> str:
        out = f"{pre}.{part}/out"
        nodes.append(helper.make_node("MatMul", [a, w(part)], [out], name=f"{pre}.{part}/MatMul"))
        return out

    q, k, v = (mm(h, f"self_attn.{p}_proj") for p in "qkv")
    attn = f"{pre}.self_attn/out"
    nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_{i}", f"past_value_{i}", "len/seqlens_k", "len/total"]
            + ["rope/cos", "rope/sin"],
            [attn, f"present_key_{i}", f"present_value_{i}"],
            name=f"{pre}.self_attn/GroupQueryAttention",
            domain="com.microsoft",
            num_heads=g.heads,
            kv_num_heads=g.kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=1.0 / math.sqrt(g.head_dim),
        )
    )
    o = mm(attn, "self_attn.o_proj")
    h2, x2 = f"{pre}/h2", f"{pre}/x2"
    nodes.append(
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [o, x, f"ln2_{i}"],
            [h2, "", "", x2],
            name=f"{pre}.post_attention_layernorm",
            domain="com.microsoft",
            epsilon=g.eps,
        )
    )
    gate, up = mm(h2, "mlp.gate_proj"), mm(h2, "mlp.up_proj")
    nodes += [
        helper.make_node("Sigmoid", [gate], [f"{pre}.mlp/sigmoid"]),
        helper.make_node("Mul", [gate, f"{pre}.mlp/sigmoid"], [f"{pre}.mlp/silu"]),
        helper.make_node("Mul", [f"{pre}.mlp/silu", up], [f"{pre}.mlp/act"]),
    ]
    return mm(f"{pre}.mlp/act", "mlp.down_proj")


def _initializers(g: Any, numpy_helper: Any) -> list[Any]:
    """DecoderGraph's buffers under their own names, the rotary tables GroupQueryAttention reads
    (cos and sin of position x inverse frequency, max positions x head_dim / 2) and a constant."""
    arrays = {name: _array(t) for name, t in g.named_buffers() if name != "inv_freq"}
    positions = torch.arange(g.max_positions, dtype=torch.float32)
    freqs = positions.unsqueeze(1) * g.get_buffer("inv_freq").float().unsqueeze(0)
    arrays["rope/cos"], arrays["rope/sin"] = _array(freqs.cos()), _array(freqs.sin())
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    inits.append(numpy_helper.from_array(np.array([1], np.int32), "len/one"))
    return inits


def decoder_model(g: Any, opset: int = 17) -> Any:
    """The ONNX model (opset `opset` and com.microsoft 1) of `g`, a DecoderGraph (export/lm.py;
    not imported here: it imports this module): inputs input_ids (batch, tokens)
    and past_key_i / past_value_i (batch, kv_heads, past, head_dim); outputs logits and
    present_key_i / present_value_i (batch, kv_heads, past + tokens, head_dim)."""
    from onnx import TensorProto, helper, numpy_helper

    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} for the LM export, got {opset}")
    nodes: list[Any] = []
    _lengths(nodes, helper, TensorProto)
    nodes.append(helper.make_node("Gather", ["embed", "input_ids"], ["x0"], name="embed/Gather"))
    nodes.append(
        helper.make_node(
            "SimplifiedLayerNormalization",
            ["x0", "ln1_0"],
            ["h0"],
            name="model.layers.0.input_layernorm",
            axis=-1,
            epsilon=g.eps,
        )
    )
    x, h = "x0", "h0"
    for i in range(g.layers_count):
        out = _block(nodes, helper, g, i, x, h)
        last = i == g.layers_count - 1
        gamma = "final_norm" if last else f"ln1_{i + 1}"
        h, x = f"h{i + 1}", f"x{i + 1}"
        nodes.append(
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [out, f"model.layers.{i}/x2", gamma],
                [h] if last else [h, "", "", x],
                name="model.norm" if last else f"model.layers.{i + 1}.input_layernorm",
                domain="com.microsoft",
                epsilon=g.eps,
            )
        )
    nodes.append(helper.make_node("MatMul", [h, "w__lm_head"], ["logits"], name="lm_head/MatMul"))
    cache: list[str | int] = ["batch", g.kv_heads, "past", g.head_dim]
    present: list[str | int] = ["batch", g.kv_heads, "total", g.head_dim]
    kinds = [(kind, i) for i in range(g.layers_count) for kind in ("key", "value")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])]
    inputs += [
        helper.make_tensor_value_info(f"past_{k}_{i}", TensorProto.FLOAT, cache) for k, i in kinds
    ]
    vocab = g.get_buffer("w__lm_head").shape[1]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "tokens", vocab])
    ]
    outputs += [
        helper.make_tensor_value_info(f"present_{k}_{i}", TensorProto.FLOAT, present)
        for k, i in kinds
    ]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, _initializers(g, numpy_helper))
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
        producer_name="edgequant",
    )


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _sibling_key(node: Any, inits: dict[str, Any], uses: dict[str, int]) -> tuple[Any, ...] | None:
    """What a weight MatMul must share with another to be merged with it: its input, and for
    MatMulNBits its attributes other than N and whether it has zero points. None when its
    weights are not initializers read by it alone."""
    weights = list(node.input[1:])
    if not weights or not all(w in inits and uses[w] == 1 for w in weights if w):
        return None
    if node.op_type == "MatMul" and len(inits[weights[0]].dims) == 2:
        return ("MatMul", node.input[0])
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(weights) <= 3:
        attrs = sorted((k, v) for k, v in _attrs(node).items() if k != "N")
        return ("MatMulNBits", node.input[0], len(weights), tuple(attrs))
    return None


def merge_sibling_matmuls(model: Any) -> int:
    """Weight MatMuls (float or MatMulNBits) that read the same input -- a block's q, k and v
    projections, its gate and up projections -- become one MatMul on their weights side by side
    and a Split: one kernel where there were three or two, for the FP32 and the quantized file
    alike (the weights are the same numbers; ONNX Runtime's kernel computes each output column
    from its own weights). Returns how many MatMuls were merged away."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for n in graph.node:
        key = _sibling_key(n, inits, uses)
        if key is not None:
            groups.setdefault(key, []).append(n)
    merged = 0
    first_of: dict[int, list[Any]] = {}
    dropped: set[int] = set()
    for members in groups.values():
        if len(members) > 1:
            first_of[id(members[0])] = _merged(graph, members, inits)
            dropped.update(id(m) for m in members)
            merged += len(members) - 1
    nodes = []
    for n in graph.node:
        nodes += first_of.get(id(n), [] if id(n) in dropped else [n])
    set_nodes(graph, _packed_attention(nodes))
    return merged


def _packed_attention(nodes: list[Any]) -> list[Any]:
    """A Split into exactly a GroupQueryAttention's query, key and value is dropped: the
    attention reads the merged q/k/v MatMul's output as its packed QKV input (key and value
    left empty), one kernel less a block."""
    splits = {tuple(n.output): n for n in nodes if n.op_type == "Split"}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    dropped = set()
    for n in nodes:
        split = splits.get(tuple(n.input[:3])) if n.op_type == "GroupQueryAttention" else None
        if split is not None and all(readers[o] == 1 for o in split.output):
            n.input[0], n.input[1], n.input[2] = split.input[0], "", ""
            dropped.add(id(split))
    return [n for n in nodes if id(n) not in dropped]


def set_nodes(graph: Any, nodes: list[Any]) -> None:
    """The graph's nodes replaced by `nodes`, and the initializers none of them reads dropped."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _merged(graph: Any, members: list[Any], inits: dict[str, Any]) -> list[Any]:
    """One MatMul (or MatMulNBits) on the members' weights concatenated along N, then a Split
    into the members' outputs."""
    from onnx import helper, numpy_helper

    arrays = [[numpy_helper.to_array(inits[w]) for w in m.input[1:]] for m in members]
    # MatMul weights are (K, N); MatMulNBits' codes, scales and zero points lead with N.
    axis = 1 if members[0].op_type == "MatMul" else 0
    widths = [a[0].shape[axis] for a in arrays]
    base = members[0].name.rsplit("/", 1)[0] + "+merged"
    names = []
    for j in range(len(arrays[0])):
        names.append(f"{base}.{j}")
        joined = np.concatenate([a[j] for a in arrays], axis=axis)
        graph.initializer.append(numpy_helper.from_array(joined, names[-1]))
    graph.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), f"{base}/widths"))
    attrs = _attrs(members[0])
    if "N" in attrs:
        attrs["N"] = sum(widths)
    first = members[0]
    return [
        helper.make_node(
            first.op_type,
            [first.input[0], *names],
            [f"{base}/out"],
            name=f"{base}/{first.op_type}",
            domain=first.domain,
            **attrs,
        ),
        helper.make_node(
            "Split",
            [f"{base}/out", f"{base}/widths"],
            [m.output[0] for m in members],
            name=f"{base}/Split",
            axis=-1,
        ),
    ]
