"""ONNX export of a causal LM (LLaMA-style decoder) with blocked 4-bit weights and a KV cache.

The graph is written from the quantized model's own tensors: `DecoderGraph` restates the decoder
in PyTorch (RMSNorm, rotary embeddings, grouped-query attention over past keys and values, SwiGLU
MLP) and holds its weights as the simulation uses them; export/lm_graph.py writes its ONNX graph
node by node with ONNX Runtime's fused CPU kernels (GroupQueryAttention,
SkipSimplifiedLayerNormalization), each Linear a MatMul on its weight. Every quantized MatMul is
then rewritten to ONNX Runtime's `MatMulNBits` on the integer codes and scales of the weight
quantizer, the quantized embedding to a Gather of its codes (export/matmul_nbits.py), and the
MatMuls that read the same input (q/k/v, gate/up) are merged into one (lm_graph.py), in the FP32
reference file alike.

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

from edgequant.export.lm_graph import decoder_model, merge_sibling_matmuls
from edgequant.export.matmul_nbits import LMExportError, rewrite_decoder
from edgequant.metrics import logits_of, next_token_nll

__all__ = ["DecoderGraph", "LMExportError", "LMExportInfo", "export_lm_onnx", "lm_session"]

# Verification: the deployed model's next token equals the simulation's on at least this share
# of positions, and its perplexity is within PPL_TOLERANCE (relative).
MIN_AGREEMENT = 0.99
PPL_TOLERANCE = 0.01
# A model that rounds inputs inside its stack of blocks (Recipe.block_int8_inputs "all") is
# chaotic at the size of float rounding: the simulation itself, its embedding output changed by
# a relative FLOOR_NOISE, moves its next tokens as much as a runtime does (BENCHMARKS.md, stop
# 35). Its file is held to that noise floor instead: next-token agreement at least the
# simulation's with itself perturbed, less AGREEMENT_SLACK, a relative logit distance at most
# DISTANCE_FACTOR times the perturbed simulation's (the mean of FLOOR_DRAWS draws), and a
# perplexity within PPL_FLOOR_FACTOR times the perturbed simulations' relative change (its root
# mean square; PPL_TOLERANCE at least): on SmolLM2-135M at INT3 g64 by round to nearest, 2 x 256
# tokens, the simulation's own perplexity moved by up to 2.5 % under such draws.
FLOOR_NOISE = 1e-6
FLOOR_DRAWS = 4
AGREEMENT_SLACK = 0.03
DISTANCE_FACTOR = 1.5
PPL_FLOOR_FACTOR = 3.0


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
    # Where the model rounds inside its blocks: the noise floor the file is held to.
    agreement_floor: float | None = None
    logit_distance: float | None = None
    logit_distance_floor: float | None = None
    perplexity_floor: float | None = None
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
    taken as the simulation uses them; `linear_names` maps each weight buffer to its layer.
    export/lm_graph.py writes the ONNX graph from these weights node by node; `forward` (with
    `empty_past`) states the same computation in PyTorch, the reference that graph and the
    Hugging Face model are tested against (tests/export/test_lm.py), not what is exported."""

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
    (next token on >= MIN_AGREEMENT of positions, perplexity within PPL_TOLERANCE; a model
    rounding inputs inside its blocks is held to the simulation's own noise floor instead, see
    AGREEMENT_SLACK), else LMExportError and nothing is written. quantized=False writes the
    float graph (the FP32 reference) without the rewrite."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        model = decoder_model(graph_module, opset)
        count, quant_embed, shared = 0, False, False
        if quantized:
            count, quant_embed, shared = rewrite_decoder(
                model, graph_module.linear_names, qmodel, notes
            )
        merged = merge_sibling_matmuls(model)
        if merged:
            notes.append(
                f"{merged} weight MatMuls merged into their siblings on the same input (q/k/v, "
                "gate/up): one kernel and a Split each"
            )
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
    simulated = _simulated_logits(qmodel, windows)
    stats = _compare(deployed, simulated, windows)
    info.agreement = stats["agreement"]
    info.perplexity_deployed = math.exp(stats["nll_a"])
    info.perplexity_simulated = math.exp(stats["nll_b"])
    info.tokens_verified = windows.numel()
    need, ppl_tolerance = MIN_AGREEMENT, PPL_TOLERANCE
    far = False
    if rounds_inside_blocks(qmodel):
        floors = [
            _compare(_simulated_logits(qmodel, windows, seed), simulated, windows)
            for seed in range(FLOOR_DRAWS)
        ]
        info.agreement_floor = float(np.mean([f["agreement"] for f in floors]))
        info.logit_distance_floor = float(np.mean([f["distance"] for f in floors]))
        info.logit_distance = stats["distance"]
        moved = [math.exp(f["nll_a"] - f["nll_b"]) - 1 for f in floors]
        info.perplexity_floor = math.sqrt(float(np.mean(np.square(moved))))
        need = min(MIN_AGREEMENT, info.agreement_floor - AGREEMENT_SLACK)
        ppl_tolerance = max(PPL_TOLERANCE, PPL_FLOOR_FACTOR * info.perplexity_floor)
        far = info.logit_distance > DISTANCE_FACTOR * info.logit_distance_floor
        info.notes.append(
            "verified against the simulation's noise floor (int8 inputs inside the blocks): "
            f"agreement {info.agreement:.4f} (the simulation with itself, its embedding changed "
            f"by {FLOOR_NOISE:g}: {info.agreement_floor:.4f}), relative logit distance "
            f"{info.logit_distance:.4f} ({info.logit_distance_floor:.4f}), perplexity moved "
            f"by {info.perplexity_deployed / info.perplexity_simulated - 1:+.2%} (the "
            f"simulation's own: {info.perplexity_floor:.2%} root mean square)"
        )
    rel = abs(info.perplexity_deployed / info.perplexity_simulated - 1)
    if info.agreement < need or rel > ppl_tolerance or far:
        floor = (
            f", relative logit distance {info.logit_distance:.4f} (needs <= {DISTANCE_FACTOR} x "
            f"the simulation's noise floor {info.logit_distance_floor:.4f})"
            if info.logit_distance is not None
            else ""
        )
        raise LMExportError(
            f"the ONNX Runtime model does not compute what the simulation computes on "
            f"{windows.shape[0]} x {windows.shape[1]} held-out tokens: next-token agreement "
            f"{info.agreement:.4f} (needs >= {need:.4f}), perplexity "
            f"{info.perplexity_deployed:.3f} deployed vs {info.perplexity_simulated:.3f} "
            f"simulated (needs within {ppl_tolerance:.1%}){floor}; nothing written"
        )


def rounds_inside_blocks(qmodel: nn.Module) -> bool:
    """Whether a Linear other than the lm_head rounds its input to int8 at run time."""
    return any(
        getattr(m, "input_block_int8", None) is not None
        for name, m in qmodel.named_modules()
        if name != "lm_head"
    )


def _simulated_logits(qmodel: nn.Module, windows: Tensor, seed: int | None = None) -> list[Tensor]:
    """The simulation's logits for each window; with `seed`, its embedding output multiplied by
    (1 + FLOOR_NOISE x a standard normal draw of that seed)."""
    hook = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)

        def perturb(_module: nn.Module, _inputs: Any, out: Tensor) -> Tensor:
            noise = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            return out * (1 + FLOOR_NOISE * noise)

        hook = cast(Any, qmodel).get_input_embeddings().register_forward_hook(perturb)
    try:
        with torch.no_grad():
            return [logits_of(qmodel(input_ids=row.reshape(1, -1)))[0] for row in windows]
    finally:
        if hook is not None:
            hook.remove()


def _compare(a_logits: Any, b_logits: list[Tensor], windows: Tensor) -> dict[str, float]:
    """Next-token agreement of a with b, their mean next-token NLLs and a's relative logit
    distance from b (Frobenius, over every window)."""
    same = total = count = 0
    nll_a = nll_b = 0.0
    diff = norm = 0.0
    for row, a_raw, b in zip(windows, a_logits, b_logits, strict=True):
        a = torch.as_tensor(a_raw).reshape(b.shape).to(b.dtype)
        ids = row.reshape(1, -1)
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += row.numel()
        x, n = next_token_nll(a.unsqueeze(0), ids)
        y, _ = next_token_nll(b.unsqueeze(0), ids)
        nll_a, nll_b, count = nll_a + x, nll_b + y, count + n
        diff += float((a - b).double().pow(2).sum())
        norm += float(b.double().pow(2).sum())
    return {
        "agreement": same / total,
        "nll_a": nll_a / count,
        "nll_b": nll_b / count,
        "distance": math.sqrt(diff / max(norm, 1e-30)),
    }
