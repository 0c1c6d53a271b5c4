"""Peers of edgequant's weight-only LM pipeline, run on the same test windows and calibration
text as `smollm2_lm.py`'s own rows: ONNX Runtime's MatMul4BitsQuantizer (round to nearest, and
HQQ), NNCF `compress_weights` (AWQ and scale estimation, ONNX backend on the FP32 ONNX export)
and torchao `IntxWeightOnlyConfig` (round to nearest, and its scale-only HQQ).

Each peer is a function (bench, grid key, bits, group) -> row dict with the keys of
smollm2_lm.py's rows. A peer whose package is absent, or that cannot express a grid, raises
PeerSkipped: `run_peers` prints why and records a row with "skipped", never crashes. A peer that
fails on a grid it claims is recorded with its "error", never hidden.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

INSTALL_HINT = "pip install -e '.[peers]'"


class PeerSkipped(Exception):
    """A peer that cannot run here: its package is absent or it has no form for the grid."""


@dataclass
class LMBench:
    """What every peer shares: the FP32 model (PyTorch and its ONNX export), the windows."""

    model: Any  # a Hugging Face causal LM (nn.Module with .config)
    fp32_path: Path
    test: Tensor  # (windows, tokens) int64, the evaluation windows of every row
    calib: Tensor  # (windows, tokens) int64, calibration text (never the test text)
    folder: Path
    layers: int
    kv_heads: int
    head_dim: int
    reference: float
    fp32_size_bytes: int


def require(package: str) -> Any:
    """The imported package, or PeerSkipped naming it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise PeerSkipped(f"package {package!r} is not installed ({INSTALL_HINT})") from err


def ort_perplexity(bench: LMBench, path: Path) -> float:
    """Perplexity of an ONNX LM file in ONNX Runtime (2 threads) on the bench's test windows."""
    from edgequant.export.lm import lm_session, run_windows
    from edgequant.metrics import next_token_nll

    session = lm_session(path, threads=2)
    total, count = 0.0, 0
    for row in bench.test:
        logits = run_windows(
            session, row.reshape(1, -1), bench.layers, bench.kv_heads, bench.head_dim
        )[0]
        nll, n = next_token_nll(torch.from_numpy(logits), row.reshape(1, -1))
        total, count = total + nll, count + n
    return math.exp(total / count)


def torch_perplexity(model: nn.Module, windows: Tensor) -> float:
    """Perplexity of a Hugging Face causal LM in PyTorch, one window at a time."""
    from edgequant.metrics import next_token_nll

    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            ids = row.reshape(1, -1)
            nll, n = next_token_nll(model(input_ids=ids).logits, ids)
            total, count = total + nll, count + n
    return math.exp(total / count)


def peer_row(
    bench: LMBench, name: str, ppl: float, path: Path, grid: str, wall_s: float, runtime: str
) -> dict:
    """A peer's row, in the shape of smollm2_lm.py's: its perplexity and file against FP32's."""
    return {
        "name": name,
        "perplexity_deployed": ppl,
        "ratio_to_reference": ppl / bench.reference,
        "size_bytes": path.stat().st_size,
        "size_ratio": path.stat().st_size / bench.fp32_size_bytes,
        "grid": grid,
        "calibration_wall_s": wall_s,
        "runtime": f"{runtime}, the same windows as every row",
    }


def onnx_row(bench: LMBench, name: str, path: Path, grid: str, wall_s: float, note: str) -> dict:
    from smollm2_lm import kernels

    ppl = ort_perplexity(bench, path)
    row = peer_row(bench, name, ppl, path, grid, wall_s, "ONNX Runtime (CPU, 2 threads)")
    return {**row, "kernels": kernels(path), "note": note}


def _head_nodes(model: Any) -> list[str]:
    """The lm_head MatMul of our export (its weight is the embedding, tied)."""
    return [
        n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "w__lm_head"
    ]


def _ort_matmul4bits(bench: LMBench, key: str, bits: int, group: int | None, algo: str) -> dict:
    require("onnxruntime")
    if bits not in (2, 4, 8):
        raise PeerSkipped(f"MatMul4BitsQuantizer takes 2, 4 or 8 bits, not {bits}")
    if group is None:
        # MatMulNBits blocks are powers of two >= 16; the inputs (576, 1536) are not.
        raise PeerSkipped(
            "MatMulNBits has no per-channel form here: blocks are powers of two "
            ">= 16 and the Linear inputs (576, 1536) are not"
        )
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    start = time.perf_counter()
    model = onnx.load(str(bench.fp32_path))
    if algo == "hqq":
        config: Any = mq.HQQWeightOnlyQuantConfig(block_size=group, bits=bits)
    else:
        config = mq.DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=True, bits=bits)
    quantizer = mq.MatMulNBitsQuantizer(
        model, algo_config=config, nodes_to_exclude=_head_nodes(model)
    )
    quantizer.process()
    path = bench.folder / f"ort_{algo}_{key}.onnx"
    quantizer.model.save_model_to_file(str(path), False)
    wall_s = time.perf_counter() - start
    grid = f"INT{bits}, group {group}, " + (
        "asymmetric (ORT's HQQ has a float zero point per group; no symmetric form)"
        if algo == "hqq"
        else "symmetric"
    )
    return onnx_row(
        bench,
        f"ort-{algo}-{key}",
        path,
        grid,
        wall_s,
        "data-free; embedding and lm_head left in FP32 by the peer",
    )


def ort_rtn(bench: LMBench, key: str, bits: int, group: int | None) -> dict:
    """ONNX Runtime MatMul4BitsQuantizer, round to nearest (symmetric)."""
    return _ort_matmul4bits(bench, key, bits, group, "rtn")


def ort_hqq(bench: LMBench, key: str, bits: int, group: int | None) -> dict:
    """ONNX Runtime MatMul4BitsQuantizer, HQQ (half-quadratic, asymmetric with float zeros)."""
    return _ort_matmul4bits(bench, key, bits, group, "hqq")


# The standard ops of our LM export whose definitions did not change from opset 17 to 21 (later
# versions only add types or optional attributes with the old behaviour as default).
_SAME_17_TO_21 = {
    "Add",
    "Cast",
    "Expand",
    "Gather",
    "MatMul",
    "Mul",
    "Shape",
    "Sigmoid",
    "SimplifiedLayerNormalization",
    "Split",
    "Squeeze",
    "Sub",
}


def _lift_to_opset_21(model: Any) -> None:
    """Per channel NNCF writes an INT4 DequantizeLinear (MatMulNBits only for groups), an INT4
    type ONNX accepts from opset 21. ONNX's version converter stops at ONNX Runtime's
    SimplifiedLayerNormalization (registered in the default domain), so the import is raised in
    place, for a graph whose standard ops all mean the same at 17 and 21."""
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    if not ops <= _SAME_17_TO_21:
        raise PeerSkipped(f"cannot lift to opset 21 in place: ops {sorted(ops - _SAME_17_TO_21)}")
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 21


def nncf_awq(bench: LMBench, key: str, bits: int, group: int | None) -> dict:
    """NNCF compress_weights INT4_SYM with AWQ and scale estimation, ONNX backend on our FP32
    ONNX export, calibrated on the bench's calibration windows; deployed in ONNX Runtime."""
    nncf = require("nncf")
    if bits != 4:
        raise PeerSkipped(f"NNCF compress_weights has integer modes of 4 and 8 bits, not {bits}")
    import onnx

    start = time.perf_counter()
    model = onnx.load(str(bench.fp32_path))
    # NNCF builds its graph's edges from tensor shapes, which ONNX's own shape inference does
    # not give for ONNX Runtime's fused ops (GroupQueryAttention, SkipSimplifiedLayerNormalization):
    # ONNX Runtime's symbolic shape inference writes them.
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    if group is None and model.opset_import[0].version < 21:
        _lift_to_opset_21(model)
    empty = np.zeros((1, bench.kv_heads, 0, bench.head_dim), np.float32)
    feeds = []
    for row in bench.calib:
        feed = {"input_ids": row.reshape(1, -1).numpy().astype(np.int64)}
        for i in range(bench.layers):
            feed[f"past_key_{i}"] = empty
            feed[f"past_value_{i}"] = empty
        feeds.append(feed)
    compressed = nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT4_SYM,
        group_size=-1 if group is None else group,
        dataset=nncf.Dataset(feeds),
        subset_size=len(feeds),
        awq=True,
        scale_estimation=True,
    )
    path = bench.folder / f"nncf_awq_se_{key}.onnx"
    onnx.save(compressed, str(path))
    wall_s = time.perf_counter() - start
    grid = f"symmetric INT{bits}, " + ("per channel" if group is None else f"group {group}")
    return onnx_row(
        bench,
        f"nncf-awq-se-{key}",
        path,
        grid,
        wall_s,
        f"NNCF {nncf.__version__} ONNX backend, AWQ + scale estimation on {len(feeds)} "
        "calibration windows; its defaults: embedding and lm_head at INT8 asymmetric (backup mode)"
        + (
            "; per channel it writes INT4 DequantizeLinear + float MatMul (opset 21), not MatMulNBits"
            if group is None
            else ""
        ),
    )


def _torchao(bench: LMBench, key: str, bits: int, group: int | None, hqq: bool) -> dict:
    require("torchao")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    start = time.perf_counter()
    model = copy.deepcopy(bench.model)
    head: Any = model.get_output_embeddings()
    config = IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"),
        granularity=PerAxis(0) if group is None else PerGroup(group),
        intx_choose_qparams_algorithm=(
            IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if hqq else IntxChooseQParamsAlgorithm.AFFINE
        ),
    )
    # lm_head is tied to the embedding: quantizing it would untie it, so it stays FP32.
    quantize_(model, config, filter_fn=lambda m, _: isinstance(m, nn.Linear) and m is not head)
    wall_s = time.perf_counter() - start
    name = f"torchao-{'hqq' if hqq else 'rtn'}-{key}"
    path = bench.folder / f"{name}.pt"
    torch.save(model.state_dict(), path)
    ppl = torch_perplexity(model, bench.test)
    grid = f"symmetric INT{bits}, " + ("per channel" if group is None else f"group {group}")
    runtime = f"PyTorch {torch.__version__} (CPU)"
    return {
        **peer_row(bench, name, ppl, path, grid, wall_s, runtime),
        "note": f"torchao {importlib.import_module('torchao').__version__} IntxWeightOnlyConfig "
        f"({'HQQ_SCALE_ONLY' if hqq else 'AFFINE'} scales), data-free; weights stored one "
        "per int8 (IntxUnpackedToInt8Tensor, dequantized in each forward; size is the saved "
        "state_dict); embedding and lm_head left in FP32",
    }


def torchao_rtn(bench: LMBench, key: str, bits: int, group: int | None) -> dict:
    """torchao IntxWeightOnlyConfig, symmetric, round to nearest (AFFINE scales)."""
    return _torchao(bench, key, bits, group, hqq=False)


def torchao_hqq(bench: LMBench, key: str, bits: int, group: int | None) -> dict:
    """torchao IntxWeightOnlyConfig, symmetric, HQQ_SCALE_ONLY scales."""
    return _torchao(bench, key, bits, group, hqq=True)


PEERS: dict[str, Callable[[LMBench, str, int, int | None], dict]] = {
    "ort-rtn": ort_rtn,
    "ort-hqq": ort_hqq,
    "nncf-awq-se": nncf_awq,
    "torchao-rtn": torchao_rtn,
    "torchao-hqq": torchao_hqq,
}


def run_peers(
    bench: LMBench,
    names: list[str],
    grids: Mapping[str, tuple[str, int, int | None]],
    on_row: Callable[[dict], None] = lambda row: None,
) -> list[dict]:
    """Every named peer at every grid (key -> (label, bits, group or None for per channel)).
    A skipped peer is printed and recorded with its reason; a failing one with its error."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; choose from {sorted(PEERS)}")
    rows = []
    for key, (label, bits, group) in grids.items():
        for name in names:
            try:
                row = PEERS[name](bench, key, bits, group)
            except PeerSkipped as why:
                print(f"skipped peer {name} at {label}: {why}", file=sys.stderr, flush=True)
                row = {"name": f"{name}-{key}", "grid": label, "skipped": str(why)}
            except Exception as err:  # a peer that fails is reported, not hidden
                row = {
                    "name": f"{name}-{key}",
                    "grid": label,
                    "error": f"{type(err).__name__}: {err}"[:300],
                }
            rows.append(row)
            on_row(row)
    return rows


def reference_from(results: Path, test_windows: str) -> tuple[float, int] | None:
    """(FP32 perplexity, FP32 file size) from a smollm2_lm.py results file measured on the same
    windows (its "test_windows" equal to `test_windows`), else None."""
    if not results.is_file():
        return None
    data = json.loads(results.read_text())
    if data.get("test_windows") != test_windows:
        return None
    fp32 = [r for r in data.get("rows", []) if r.get("name") == "fp32"]
    if not fp32 or "perplexity_deployed" not in fp32[0]:
        return None
    return float(fp32[0]["perplexity_deployed"]), int(fp32[0]["size_bytes"])


def run_standalone(
    args: Any,
    model: Any,
    test: Tensor,
    calib: Tensor,
    grids: Mapping[str, tuple[str, int, int | None]],
) -> None:
    """smollm2_lm.py --peers-only: the FP32 ONNX export, then the named peers on the script's
    own windows, written to --peers-out after every row. The FP32 reference is taken from
    --out (smollm2_lm.py's results) where it was measured on the same windows, else measured."""
    import platform

    import onnxruntime

    from edgequant.export.lm import export_lm_onnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import write_json

    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    fp32_path = folder / "fp32.onnx"
    export_lm_onnx(model, fp32_path, quantized=False)
    test_label = f"first {len(test)} x {test.shape[1]} tokens of wikitext2_raw_test.txt"
    bench = LMBench(
        model,
        fp32_path,
        test,
        calib,
        folder,
        layers,
        kv_heads,
        head_dim,
        reference=math.nan,
        fp32_size_bytes=fp32_path.stat().st_size,
    )
    known = reference_from(Path(args.out), test_label)
    if known is not None and known[1] == bench.fp32_size_bytes:
        bench.reference, source = known[0], f"{args.out} (fp32 row, the same windows and file size)"
    else:
        start = time.perf_counter()
        bench.reference = ort_perplexity(bench, fp32_path)
        source = f"measured in this run ({time.perf_counter() - start:.0f} s)"
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to FP32)",
        "metric": "perplexity (lower is better), non-overlapping windows",
        "test_windows": test_label,
        "calibration": f"first {len(calib)} x {calib.shape[1]} tokens of "
        "wikitext2_valid_tokenized.txt (NNCF's dataset; the other peers are data-free)",
        "reference_perplexity": bench.reference,
        "reference_source": source,
        "fp32_size_bytes": bench.fp32_size_bytes,
        "environment": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(),
            "ort_threads": 2,
            "torch_threads": torch.get_num_threads(),
        },
        "rows": [],
    }

    # Rows of an earlier run on the same windows, calibration and reference are kept (a grid
    # at a time keeps each run short); a row measured again replaces its old one.
    out = Path(args.peers_out)
    if out.is_file():
        old = json.loads(out.read_text())
        same = ("test_windows", "calibration", "reference_perplexity", "fp32_size_bytes")
        if all(old.get(k) == results[k] for k in same):
            results["rows"] = old.get("rows", [])

    def on_row(row: dict) -> None:
        row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results["rows"] = [r for r in results["rows"] if r["name"] != row["name"]] + [row]
        print(row, flush=True)
        write_json(args.peers_out, results)

    write_json(args.peers_out, results)
    run_peers(bench, args.peers_only.split(","), grids, on_row)
