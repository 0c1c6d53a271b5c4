"""ONNX export of a causal LM (LLaMA-style decoder) with blocked 4-bit weights and a KV cache.

The graph is written from the quantized model's own tensors: a plain PyTorch re-statement of the
decoder (`DecoderGraph`: RMSNorm, rotary embeddings, grouped-query attention over past keys and
values, SwiGLU MLP) is exported with each quantized Linear as a MatMul on its dequantized weight,
then every such MatMul is rewritten to ONNX Runtime's `MatMulNBits` (com.microsoft) on the
integer codes and scales of the weight quantizer: 4-bit containers for <= 4 bits (INT3/INT2
codes sit in INT4 containers). An 8-bit layer (lm_head) keeps its 8-bit codes in the file but is
written as a float MatMul on them, dequantized by constant ops that ONNX Runtime folds when it
loads the file: its CPU MatMulNBits has no fast 8-bit kernel for float inputs (it unpacks the
whole weight on every call), and its int8 one rounds the inputs to int8, which the simulation
does not. A per-output-channel grid is
written as blocks whose scales repeat the channel's scale (MatMulNBits takes power-of-two blocks;
576 is not one). An 8-bit per-row embedding is a Gather of the integer table and its scales; a
tied lm_head reads the same initializers (one table in the file).

Inputs: input_ids (batch, tokens) and past_key_i / past_value_i (batch, kv_heads, past, head_dim)
for each block (zero-length past for the first step); outputs: logits and present_key_i /
present_value_i. Positions continue from the past length (no padding inside a batch).

Verification runs the written file in ONNX Runtime on held-out token windows and compares with
the simulation (the fake-quantized PyTorch model): next-token agreement and perplexity.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.metrics import logits_of, next_token_nll
from edgequant.modules import QuantMixin

__all__ = ["DecoderGraph", "LMExportError", "LMExportInfo", "export_lm_onnx", "lm_session"]

# Verification: the deployed model's next token equals the simulation's on at least this share
# of positions, and its perplexity is within PPL_TOLERANCE (relative).
MIN_AGREEMENT = 0.99
PPL_TOLERANCE = 0.01


class LMExportError(RuntimeError):
    """The exported language model does not compute what the simulation computes."""


@dataclass
class LMExportInfo:
    path: str
    size_bytes: int
    matmul_nbits: int
    quantized_embedding: bool
    tied_table: bool
    agreement: float | None = None
    perplexity_deployed: float | None = None
    perplexity_simulated: float | None = None
    tokens_verified: int = 0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def _weight(layer: nn.Module) -> Tensor:
    """A layer's weight as the simulation uses it (fake-quantized when quantized)."""
    w = cast(Tensor, layer.weight).detach()
    wq = getattr(layer, "weight_quantizer", None)
    if wq is not None and wq.mode == "quantize":
        with torch.no_grad():
            w = wq(w)
    return w.float()


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise ValueError(f"rotary embedding type {kind!r} is not supported (only 'default')")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model's config gives no rope_theta")
    return float(theta)


class DecoderGraph(nn.Module):
    """A LLaMA-style causal LM restated with explicit KV-cache tensors, for export.

    Built from a Hugging Face LlamaForCausalLM (float or quantized by edgequant): weights are
    taken as the simulation uses them; `linear_names` maps each weight buffer to its layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        required = ("embed_tokens", "layers", "norm")
        if config is None or inner is None or not all(hasattr(inner, r) for r in required):
            raise ValueError(
                "export_lm_onnx takes a LLaMA-style causal LM (Hugging Face "
                "LlamaForCausalLM: .config, .model.embed_tokens/.layers/.norm, .lm_head); got "
                f"{type(model).__name__}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", self.heads))
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.max_positions = int(config.max_position_embeddings)
        theta = _rope_theta(config)
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        self.register_buffer("inv_freq", inv_freq)
        self.linear_names: dict[str, str] = {}
        self.layers_count = len(inner.layers)
        self.register_buffer("embed", _weight(inner.embed_tokens))
        self.register_buffer("final_norm", inner.norm.weight.detach().float().clone())
        for i, block in enumerate(inner.layers):
            attn, mlp = block.self_attn, block.mlp
            for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
                self._linear(f"model.layers.{i}.self_attn.{part}", getattr(attn, part))
            for part in ("gate_proj", "up_proj", "down_proj"):
                self._linear(f"model.layers.{i}.mlp.{part}", getattr(mlp, part))
            self.register_buffer(f"ln1_{i}", block.input_layernorm.weight.detach().float().clone())
            self.register_buffer(
                f"ln2_{i}", block.post_attention_layernorm.weight.detach().float().clone()
            )
        self._linear("lm_head", cast(nn.Module, model.lm_head))

    def _linear(self, name: str, layer: nn.Module) -> None:
        if getattr(layer, "bias", None) is not None:
            raise ValueError(f"layer {name!r} has a bias; the LM export takes bias-free Linears")
        key = "w__" + name.replace(".", "__")
        self.register_buffer(key, _weight(layer).t().contiguous())
        self.linear_names[key] = name

    def _w(self, name: str) -> Tensor:
        return cast(Tensor, getattr(self, "w__" + name.replace(".", "__")))

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        batch, tokens = input_ids.shape[0], input_ids.shape[1]
        past_len = past[0].shape[2]
        positions = torch.arange(tokens, dtype=torch.float32) + past_len
        inv_freq = cast(Tensor, self.inv_freq)
        freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        total = past_len + tokens
        keys = torch.arange(total).unsqueeze(0)
        queries = (torch.arange(tokens) + past_len).unsqueeze(1)
        mask = torch.where(keys <= queries, 0.0, float("-inf"))
        x = torch_F.embedding(input_ids, cast(Tensor, self.embed))
        presents: list[Tensor] = []
        rep = self.heads // self.kv_heads
        for i in range(self.layers_count):
            pre = f"model.layers.{i}"
            h = self._norm(x, cast(Tensor, getattr(self, f"ln1_{i}")))
            q = (h @ self._w(f"{pre}.self_attn.q_proj")).reshape(batch, tokens, self.heads, -1)
            k = (h @ self._w(f"{pre}.self_attn.k_proj")).reshape(batch, tokens, self.kv_heads, -1)
            v = (h @ self._w(f"{pre}.self_attn.v_proj")).reshape(batch, tokens, self.kv_heads, -1)
            q = self._rotate(q.transpose(1, 2), cos, sin)
            k = self._rotate(k.transpose(1, 2), cos, sin)
            v = v.transpose(1, 2)
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            kr = k.unsqueeze(2).expand(batch, self.kv_heads, rep, total, self.head_dim)
            vr = v.unsqueeze(2).expand(batch, self.kv_heads, rep, total, self.head_dim)
            kr = kr.reshape(batch, self.heads, total, self.head_dim)
            vr = vr.reshape(batch, self.heads, total, self.head_dim)
            scores = (q @ kr.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
            attn = torch.softmax(scores, dim=-1) @ vr
            attn = attn.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
            x = x + attn @ self._w(f"{pre}.self_attn.o_proj")
            h = self._norm(x, cast(Tensor, getattr(self, f"ln2_{i}")))
            gate = h @ self._w(f"{pre}.mlp.gate_proj")
            up = h @ self._w(f"{pre}.mlp.up_proj")
            x = x + (torch_F.silu(gate) * up) @ self._w(f"{pre}.mlp.down_proj")
        x = self._norm(x, cast(Tensor, self.final_norm))
        logits = x @ self._w("lm_head")
        return (logits, *presents)

    def empty_past(self, batch: int = 1) -> list[Tensor]:
        return [
            torch.zeros(batch, self.kv_heads, 0, self.head_dim)
            for _ in range(2 * self.layers_count)
        ]


# --- the rewrite to MatMulNBits ----------------------------------------------------------------


def _block_size(k: int, group: int | None, name: str) -> int:
    if group is not None:
        if group < 16 or group & (group - 1):
            raise ValueError(
                f"layer {name!r}: group size {group} is not a power of two >= 16, which "
                "ONNX Runtime's MatMulNBits needs"
            )
        return group
    for size in (128, 64, 32, 16):
        if k % size == 0:
            return size
    raise ValueError(f"layer {name!r}: input size {k} is not a multiple of 16 (MatMulNBits blocks)")


@dataclass
class _Packed:
    data: np.ndarray  # uint8 (N, blocks, blob)
    scales: np.ndarray  # float32 (N, blocks)
    zero_points: np.ndarray | None  # uint8, packed as MatMulNBits reads them
    bits: int
    block: int
    k: int
    n: int


def pack_linear(layer: QuantMixin, name: str) -> _Packed:
    """A quantized Linear's integer codes and scales in MatMulNBits' layout."""
    wq = layer.weight_quantizer
    assert wq is not None
    spec = wq.spec
    w = cast(Tensor, layer.weight).detach()
    n, k = w.shape
    if spec.granularity == "group" and wq.axis == 1:
        group: int | None = spec.group_size
    elif spec.granularity == "channel" and wq.axis == 0:
        group = None
    else:
        raise ValueError(
            f"layer {name!r}: {spec.short()} has no MatMulNBits form (per output channel or "
            "per group of inputs only)"
        )
    if spec.bits > 8 or spec.bits in (5, 6, 7):
        raise ValueError(f"layer {name!r}: {spec.bits}-bit weights have no MatMulNBits container")
    block = _block_size(k, group, name)
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
    return _Packed(
        data, scales.contiguous().numpy().astype(np.float32), zero_points, container, block, k, n
    )


def _rewrite(
    onnx_model: Any, graph_module: DecoderGraph, qmodel: nn.Module, notes: list[str]
) -> tuple[int, bool, bool]:
    """MatMul on a quantized weight -> MatMulNBits; the quantized embedding's Gather -> a Gather
    of codes and scales. Returns (MatMulNBits count, embedding quantized, one shared table)."""
    from onnx import helper

    graph = onnx_model.graph
    packed = _packed_layers(graph_module, qmodel)
    new_nodes, replaced = _matmuls_to_nbits(graph, graph_module, packed, notes)
    missing = set(packed) - replaced
    if missing:
        raise LMExportError(
            "no MatMul on the weights of "
            + ", ".join(sorted(graph_module.linear_names[k] for k in missing))
            + " in the exported graph (the exporter changed their form)"
        )
    quant_embed, shared = _quantized_embedding(
        graph, graph_module, qmodel, packed, new_nodes, notes
    )
    del graph.node[:]
    graph.node.extend(new_nodes)
    keep = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in keep]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(n.op_type == "MatMulNBits" for n in new_nodes), quant_embed, shared


def _packed_layers(graph_module: DecoderGraph, qmodel: nn.Module) -> dict[str, _Packed]:
    """The packed weights of every quantized Linear, by the name of its weight in the graph."""
    packed: dict[str, _Packed] = {}
    for key, name in graph_module.linear_names.items():
        layer = qmodel.get_submodule(name)
        wq = getattr(layer, "weight_quantizer", None)
        if wq is not None and wq.mode == "quantize":
            packed[key] = pack_linear(cast(QuantMixin, layer), name)
    return packed


def _matmuls_to_nbits(
    graph: Any, graph_module: DecoderGraph, packed: dict[str, _Packed], notes: list[str]
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
        name = graph_module.linear_names[key]
        data_name, scale_name = f"{name}.qweight", f"{name}.scales"
        if data_name not in inits:
            graph.initializer.append(numpy_helper.from_array(p.data, data_name))
            graph.initializer.append(numpy_helper.from_array(p.scales.reshape(-1), scale_name))
            inits.add(data_name)
        inputs = [node.input[0], data_name, scale_name]
        if p.zero_points is not None:
            zp_name = f"{name}.zero_points"
            graph.initializer.append(numpy_helper.from_array(p.zero_points, zp_name))
            inputs.append(zp_name)
        if p.bits == 8:
            new_nodes.extend(
                _dequantized_matmul(graph, node, p, name, data_name, scale_name, inputs)
            )
            notes.append(
                f"{name}: 8-bit codes in the file, run as a float MatMul on them (ONNX Runtime "
                "folds the dequantization when it loads the file)"
            )
            replaced.add(key)
            continue
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
            )
        )
        replaced.add(key)
    return new_nodes, replaced


def _dequantized_matmul(
    graph: Any, node: Any, p: _Packed, name: str, data: str, scales: str, inputs: list[str]
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
            "MatMul", [inputs[0], f"{t}.weight_t"], list(node.output), name=f"{name}/MatMul"
        ),
    ]


def _quantized_embedding(
    graph: Any,
    graph_module: DecoderGraph,
    qmodel: nn.Module,
    packed: dict[str, _Packed],
    new_nodes: list[Any],
    notes: list[str],
) -> tuple[bool, bool]:
    """An 8-bit per-row embedding becomes, in `new_nodes`, a Gather of its codes and of its row
    scales (the tied lm_head's table when it is the same). Returns (quantized, shared)."""
    from onnx import TensorProto, helper, numpy_helper

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
    w = cast(Tensor, embed_layer.weight).detach()
    head = qmodel.get_submodule("lm_head")
    head_key = {n: k for k, n in graph_module.linear_names.items()}["lm_head"]
    shared = (
        getattr(head, "weight", None) is embed_layer.weight
        and head_key in packed
        and packed[head_key].bits == 8
        and bool(torch.equal(cast(Any, head).weight_quantizer.scale, ewq.scale))
    )
    if shared:
        table, scales = "lm_head.qweight", "lm_head.scales"
        p = packed[head_key]
        blocks = p.data.shape[1]
        graph.initializer.append(
            numpy_helper.from_array(np.array([p.n, blocks], dtype=np.int64), "embed.scale_shape")
        )
        scale_rows = "embed.scale_rows"
        new_nodes.insert(
            0, helper.make_node("Reshape", [scales, "embed.scale_shape"], [scale_rows])
        )
        notes.append("lm_head and model.embed_tokens are tied: one 8-bit table in the file")
    else:
        q = F.quantize(w, ewq.scale, ewq.zero_point, spec.qmin, spec.qmax, 0, None)
        v, d = w.shape
        block = _block_size(d, None, "model.embed_tokens")
        blocks = d // block
        table, scale_rows = "embed.qweight", "embed.scales"
        graph.initializer.append(
            numpy_helper.from_array(
                (q + 128).to(torch.uint8).reshape(v, blocks, block).numpy(), table
            )
        )
        graph.initializer.append(
            numpy_helper.from_array(
                ewq.scale.float().reshape(v, 1).expand(v, blocks).contiguous().numpy(), scale_rows
            )
        )
    gathers = [n for n in new_nodes if n.op_type == "Gather" and n.input[0] == "embed"]
    if len(gathers) != 1:
        raise LMExportError(f"expected one Gather on the embedding table, found {len(gathers)}")
    gather = gathers[0]
    ids, out = gather.input[1], gather.output[0]
    for value, name in (
        (np.array([128.0], np.float32), "embed.offset"),
        (np.array([-1], np.int64), "embed.last_axis"),
        (np.array([0, 0, -1], np.int64), "embed.flat_shape"),
    ):
        graph.initializer.append(numpy_helper.from_array(value, name))
    replacement = [
        helper.make_node("Gather", [table, ids], ["embed.codes"], axis=0),
        helper.make_node("Cast", ["embed.codes"], ["embed.codes_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["embed.codes_f", "embed.offset"], ["embed.centered"]),
        helper.make_node("Gather", [scale_rows, ids], ["embed.row_scales"], axis=0),
        helper.make_node("Unsqueeze", ["embed.row_scales", "embed.last_axis"], ["embed.s4"]),
        helper.make_node("Mul", ["embed.centered", "embed.s4"], ["embed.blocks"]),
        helper.make_node("Reshape", ["embed.blocks", "embed.flat_shape"], [out]),
    ]
    index = new_nodes.index(gather)
    new_nodes[index : index + 1] = replacement
    return True, shared


def lm_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_windows(
    session: Any, windows: Tensor, layers: int, kv_heads: int, head_dim: int
) -> list[np.ndarray]:
    """Logits of each window (batch 1, empty past)."""
    out = []
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    for row in windows:
        feeds = {"input_ids": row.reshape(1, -1).numpy().astype(np.int64)}
        for i in range(layers):
            feeds[f"past_key_{i}"] = empty
            feeds[f"past_value_{i}"] = empty
        out.append(session.run(["logits"], feeds)[0])
    return out


def export_lm_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    verify_windows: Tensor | None = None,
    quantized: bool = True,
    opset: int = 17,
) -> LMExportInfo:
    """Write `qmodel` (a LLaMA-style causal LM, quantized by edgequant or float) as ONNX with a
    KV cache; quantized Linears become MatMulNBits. With `verify_windows` (N, T) token ids of
    held-out text, the written file runs in ONNX Runtime and must agree with the simulation
    (next token on >= MIN_AGREEMENT of positions, perplexity within PPL_TOLERANCE), else
    LMExportError and nothing is written. quantized=False writes the float graph (the FP32
    reference) without the rewrite."""
    import onnx

    start = time.perf_counter()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path ending in .onnx")
    if verify_windows is not None and (
        not isinstance(verify_windows, Tensor) or verify_windows.dim() != 2
    ):
        raise TypeError("verify_windows must be a (windows, tokens) tensor of token ids")
    graph_module = DecoderGraph(qmodel).eval()
    if verify_windows is not None and verify_windows.shape[1] > graph_module.max_positions:
        raise ValueError(
            f"verify_windows has {verify_windows.shape[1]} tokens a window, longer than the "
            f"model's context ({graph_module.max_positions})"
        )
    notes: list[str] = []
    names = ["input_ids"] + [
        f"past_{kind}_{i}" for i in range(graph_module.layers_count) for kind in ("key", "value")
    ]
    outputs = ["logits"] + [
        f"present_{kind}_{i}" for i in range(graph_module.layers_count) for kind in ("key", "value")
    ]
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"}}
    for n in names[1:]:
        dynamic[n] = {0: "batch", 2: "past"}
    for n in outputs[1:]:
        dynamic[n] = {0: "batch", 2: "total"}
    example = (
        torch.zeros(1, 3, dtype=torch.int64),
        *[
            torch.zeros(1, graph_module.kv_heads, 2, graph_module.head_dim)
            for _ in range(2 * graph_module.layers_count)
        ],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(
                graph_module,
                example,
                str(raw),
                input_names=names,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=False,
            )
        model = onnx.load(str(raw))
        count, quant_embed, shared = 0, False, False
        if quantized:
            count, quant_embed, shared = _rewrite(model, graph_module, qmodel, notes)
        out_tmp = Path(tmp) / "model.onnx"
        onnx.save(model, str(out_tmp))
        info = LMExportInfo(
            str(path), out_tmp.stat().st_size, count, quant_embed, shared, notes=notes
        )
        if verify_windows is not None:
            _verify(out_tmp, qmodel, graph_module, verify_windows, info)
        os.replace(out_tmp, path)
    info.wall_s = time.perf_counter() - start
    return info


def _verify(
    file: Path, qmodel: nn.Module, graph_module: DecoderGraph, windows: Tensor, info: LMExportInfo
) -> None:
    session = lm_session(file)
    deployed = run_windows(
        session, windows, graph_module.layers_count, graph_module.kv_heads, graph_module.head_dim
    )
    same, total = 0, 0
    nll_d = nll_s = 0.0
    count = 0
    with torch.no_grad():
        for row, logits_d in zip(windows, deployed, strict=True):
            ids = row.reshape(1, -1)
            logits_s = logits_of(qmodel(input_ids=ids))
            ld = torch.from_numpy(logits_d)
            same += int((ld.argmax(-1) == logits_s.argmax(-1)).sum())
            total += ids.numel()
            a, n = next_token_nll(ld, ids)
            b, _ = next_token_nll(logits_s, ids)
            nll_d, nll_s, count = nll_d + a, nll_s + b, count + n
    info.agreement = same / total
    info.perplexity_deployed = math.exp(nll_d / count)
    info.perplexity_simulated = math.exp(nll_s / count)
    info.tokens_verified = total
    rel = abs(info.perplexity_deployed / info.perplexity_simulated - 1)
    if info.agreement < MIN_AGREEMENT or rel > PPL_TOLERANCE:
        raise LMExportError(
            f"the ONNX Runtime model does not compute what the simulation computes on "
            f"{windows.shape[0]} x {windows.shape[1]} held-out tokens: next-token agreement "
            f"{info.agreement:.4f} (needs >= {MIN_AGREEMENT}), perplexity "
            f"{info.perplexity_deployed:.3f} deployed vs {info.perplexity_simulated:.3f} "
            f"simulated (needs within {PPL_TOLERANCE:.0%}); nothing written"
        )
