"""SmolLM2-135M at 4 bits and below, deployed in ONNX Runtime: perplexity on WikiText-2 test
windows (non-overlapping, 512 tokens, the same windows for every row) of the exported models,
edgequant's plain calls beside ONNX Runtime's MatMul4BitsQuantizer (round to nearest and HQQ),
file sizes, decode speed with the KV cache at batch 1, and greedy generation against FP32.

    PYTHONPATH=$PWD flock /tmp/edgequant-bench.lock python benchmarks/smollm2_lm.py \
        [--windows 64] [--calib 32] [--grids g64,pc,int3g64] [--out benchmarks/results/smollm2_lm.json]

Calibration: the first --calib windows of data/text/wikitext2_valid_tokenized.txt (never the
test text). Export verification: 2 windows of 256 tokens of Tiny Shakespeare (held out).
Results are written after every row, so a run cut off keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import interleaved_rounds, write_json  # noqa: E402
from _smollm2 import cache_shape, load_or_skip  # noqa: E402

import edgequant as eq  # noqa: E402
from edgequant.spec import weight_spec  # noqa: E402

GRIDS = {
    "g64": ("symmetric INT4, group 64", 4, 64),
    "pc": ("symmetric INT4, per channel", 4, None),
    "int3g64": ("symmetric INT3, group 64", 3, 64),
}
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "In 1492, Christopher Columbus",
    "The theory of relativity was developed by",
    "A healthy breakfast usually includes",
    "The main ingredient of guacamole is",
    "To make a cup of tea, you first",
    "The Great Wall of China was built to",
    "Photosynthesis is the process by which",
    "The first man to walk on the moon was",
    "Python is a programming language that",
    "The human heart has four",
    "Shakespeare wrote the play",
    "The speed of light is approximately",
    "Mount Everest is located in",
    "The French Revolution began in",
    "Dogs are known for their",
    "The Pacific Ocean is the",
    "An apple a day",
]


def ort_perplexity(path: Path, windows: torch.Tensor, layers: int, kv: int, hd: int) -> float:
    from edgequant.export.lm import lm_session, run_windows
    from edgequant.metrics import next_token_nll

    session = lm_session(path, threads=2)
    total, count = 0.0, 0
    for row in windows:
        logits = run_windows(session, row.reshape(1, -1), layers, kv, hd)[0]
        nll, n = next_token_nll(torch.from_numpy(logits), row.reshape(1, -1))
        total, count = total + nll, count + n
    return math.exp(total / count)


def greedy(path: Path, tok: Any, layers: int, kv: int, hd: int, new: int = 16) -> list[list[int]]:
    from edgequant.export.lm import lm_session

    session = lm_session(path, threads=2)
    outs = ["logits"] + [f"present_{k}_{i}" for i in range(layers) for k in ("key", "value")]
    result = []
    for prompt in PROMPTS:
        ids = np.array([tok(prompt, add_special_tokens=False)["input_ids"]], dtype=np.int64)
        past = {
            f"past_{k}_{i}": np.zeros((1, kv, 0, hd), np.float32)
            for i in range(layers)
            for k in ("key", "value")
        }
        tokens = []
        for _ in range(new):
            out = session.run(outs, {"input_ids": ids, **past})
            nxt = int(out[0][0, -1].argmax())
            tokens.append(nxt)
            ids = np.array([[nxt]], dtype=np.int64)
            past = {
                f"past_{k}_{i}": out[1 + 2 * i + (k == "value")]
                for i in range(layers)
                for k in ("key", "value")
            }
        result.append(tokens)
    return result


def torch_greedy(model: Any, tok: Any, new: int = 16) -> list[list[int]]:
    """The PyTorch model's greedy tokens on PROMPTS, token by token with its KV cache and, as
    the ONNX loop, no stop at the end-of-text token."""
    result = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            past, tokens = None, []
            for _ in range(new):
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
                nxt = int(out.logits[0, -1].argmax())
                tokens.append(nxt)
                past, ids = out.past_key_values, torch.tensor([[nxt]])
            result.append(tokens)
    return result


def leading_match(gen: list[list[int]], ref: list[list[int]]) -> list[int]:
    """Per prompt, how many leading tokens equal the reference's."""
    counts = []
    for a, b in zip(gen, ref, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        counts.append(n)
    return counts


def decode_speed(
    session: Any, layers: int, kv: int, hd: int, prompt: int = 32, new: int = 16
) -> float:
    """Tokens per second generating `new` tokens one at a time after a `prompt`-token prefill."""
    outs = ["logits"] + [f"present_{k}_{i}" for i in range(layers) for k in ("key", "value")]
    past = {
        f"past_{k}_{i}": np.zeros((1, kv, 0, hd), np.float32)
        for i in range(layers)
        for k in ("key", "value")
    }
    out = session.run(outs, {"input_ids": np.arange(prompt, dtype=np.int64).reshape(1, -1), **past})
    start = time.perf_counter()
    for _ in range(new):
        past = {
            f"past_{k}_{i}": out[1 + 2 * i + (k == "value")]
            for i in range(layers)
            for k in ("key", "value")
        }
        nxt = np.array([[int(out[0][0, -1].argmax())]], dtype=np.int64)
        out = session.run(outs, {"input_ids": nxt, **past})
    return new / (time.perf_counter() - start)


def interleaved_decode(
    files: dict[str, Path], layers: int, kv: int, hd: int, rounds: int
) -> dict[str, list[float]]:
    """Decode speed of every file, measured side by side: one session each (2 threads), then
    `rounds` rounds in which every file decodes 16 tokens, in a rotating order."""
    from edgequant.export.lm import lm_session

    sessions = {name: lm_session(path, threads=2) for name, path in files.items()}
    for session in sessions.values():  # warm-up
        decode_speed(session, layers, kv, hd, new=4)
    return interleaved_rounds(
        {name: partial(decode_speed, s, layers, kv, hd) for name, s in sessions.items()}, rounds
    )


def kernels(path: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs after its optimisations (the kernels it picks)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for n in graph.node:
        if n.op_type in (
            "MatMulNBits",
            "MatMul",
            "Gather",
            "DequantizeLinear",
            "GatherBlockQuantized",
        ):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def peer(fp32: Path, out: Path, algo: str, bits: int = 4, block: int = 64) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    model = onnx.load(str(fp32))
    if algo == "hqq":
        config: Any = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    else:
        config = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)
    # lm_head stays FP32 (it is tied to the embedding; edgequant keeps it at 8 bits).
    head = [
        n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "w__lm_head"
    ]
    quantizer = mq.MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=head)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--grids", default="g64,pc,int3g64")
    parser.add_argument("--peers", default="rtn,hqq")
    parser.add_argument("--skip-rtn", action="store_true")
    parser.add_argument(
        "--peers-only",
        default="",
        help="only these peers of benchmarks/_lm_peers.py (comma-separated: ort-rtn, ort-hqq, "
        "nncf-awq-se, torchao-rtn, torchao-hqq) on this script's windows, written to --peers-out",
    )
    parser.add_argument("--peers-out", default="benchmarks/results/smollm2_peers.json")
    parser.add_argument("--out", default="benchmarks/results/smollm2_lm.json")
    parser.add_argument("--models", default="/tmp/smollm2_models")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--append",
        action="store_true",
        help="add the --grids rows to --out, reusing its FP32 row and --models/fp32.onnx from "
        "an earlier run on the same windows and calibration (a long run in shorter pieces); "
        "decode speed is then re-measured for every row's file side by side",
    )
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="only re-measure decode speed of the files a previous run left in --models "
        "(on a quieter machine), updating the rows of --out",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    import onnxruntime

    from edgequant.examples.smollm2 import (
        SHAKESPEARE_TEXT,
        TEST_TEXT,
        calibration_batches,
        text_windows,
    )
    from edgequant.export.lm import export_lm_onnx

    loaded = load_or_skip()
    if loaded is None:
        return
    model, tok = loaded
    layers, kv, hd = cache_shape(model)
    if args.decode_only:
        decode_again(args, layers, kv, hd)
        return
    test = text_windows(tok, TEST_TEXT, 512, args.windows)
    verify = text_windows(tok, SHAKESPEARE_TEXT, 256, 2)
    calib = calibration_batches(tok, 512, args.calib, 4)
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    if args.peers_only:
        from _lm_peers import run_standalone

        calib_windows = torch.cat([b["input_ids"] for b in calib])
        run_standalone(
            args, model, test, calib_windows, {k: GRIDS[k] for k in args.grids.split(",")}
        )
        return
    fp32_path = folder / "fp32.onnx"
    if args.append:
        import json

        results = json.loads(Path(args.out).read_text())
        for key in ("test_windows", "calibration"):
            want = {
                "test_windows": f"first {args.windows} x 512",
                "calibration": f"first {args.calib} x 512",
            }[key]
            if not results[key].startswith(want + " "):
                raise SystemExit(f"--append: {args.out} has {key} {results[key]!r}, not {want}")
        fp32_row = next(r for r in results["rows"] if r["name"] == "fp32")
        if not fp32_path.is_file() or fp32_path.stat().st_size != fp32_row["size_bytes"]:
            raise SystemExit(f"--append: {fp32_path} is not the file of {args.out}'s FP32 row")
        ref, fp32_size = results["reference_perplexity"], fp32_row["size_bytes"]
        fp32_greedy = fp32_row["greedy_ids"]
        results["rows"] = [
            r
            for r in results["rows"]
            if not any(r["name"].endswith(f"-{g}") for g in args.grids.split(","))
        ]
    else:
        results: dict[str, Any] = {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to FP32)",
            "metric": "perplexity (lower is better), non-overlapping windows",
            "test_windows": f"first {args.windows} x 512 tokens of wikitext2_raw_test.txt",
            "calibration": f"first {args.calib} x 512 tokens of wikitext2_valid_tokenized.txt",
            "verification": "2 x 256 tokens of tinyshakespeare.txt",
            "environment": {
                "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__,
                "cpu": platform.processor() or platform.machine(),
                "ort_threads": 2,
                "torch_threads": 1,
            },
            "rows": [],
        }

    def save() -> None:
        write_json(args.out, results)

    def row(**kw: Any) -> None:
        results["rows"].append(kw)
        print({k: v for k, v in kw.items() if k not in ("greedy", "greedy_ids")}, flush=True)
        save()

    if not args.append:
        info = export_lm_onnx(model, fp32_path, quantized=False)
        fp32_size = info.size_bytes
        start = time.perf_counter()
        ref = ort_perplexity(fp32_path, test, layers, kv, hd)
        fp32_greedy = greedy(fp32_path, tok, layers, kv, hd)
        eval_s = time.perf_counter() - start
        # The greedy bar compares against this file's tokens: they must be PyTorch's own.
        own = leading_match(fp32_greedy, torch_greedy(model, tok))
        row(
            name="fp32",
            perplexity_deployed=ref,
            size_bytes=fp32_size,
            kernels=kernels(fp32_path),
            eval_wall_s=eval_s,
            greedy_16_onnx_vs_torch=f"{sum(n == 16 for n in own)}/{len(PROMPTS)}",
            greedy_onnx_vs_torch_leading=own,
            greedy_ids=fp32_greedy,
        )
        results["reference_perplexity"] = ref

    files = {"fp32": fp32_path}

    def evaluate(name: str, path: Path, extra: dict[str, Any]) -> None:
        files[name] = path
        ppl = ort_perplexity(path, test, layers, kv, hd)
        gen = greedy(path, tok, layers, kv, hd)
        same = sum(a == b for a, b in zip(gen, fp32_greedy, strict=True))
        lead = leading_match(gen, fp32_greedy)
        row(
            name=name,
            perplexity_deployed=ppl,
            ratio_to_reference=ppl / ref,
            size_bytes=path.stat().st_size,
            size_ratio=path.stat().st_size / fp32_size,
            kernels=kernels(path),
            greedy_16_match_fp32=f"{same}/{len(PROMPTS)}",
            greedy_leading_match=lead,
            greedy=[tok.decode(g) for g in gen[:4]],
            **extra,
        )

    for key in args.grids.split(","):
        label, bits, group = GRIDS[key]
        recipe = eq.Recipe(
            name=key, weight=weight_spec(bits, group), activation=None, first_last_bits=8
        )
        # Per channel, no peer can express the grid (MatMul4BitsQuantizer's blocks are powers
        # of two): our own round to nearest is the reference row there.
        if not args.skip_rtn or group is None:
            q = eq.quantize(model, recipe, method="weight_only")
            path = folder / f"rtn_{key}.onnx"
            ex = export_lm_onnx(q, path, verify_windows=verify)
            evaluate(f"edgequant-rtn-{key}", path, {"grid": label, "agreement": ex.agreement})
        start = time.perf_counter()
        q = eq.quantize(model, recipe, calib_data=calib, method="weight_only", progress=True)
        calib_s = time.perf_counter() - start
        path = folder / f"edgequant_{key}.onnx"
        ex = export_lm_onnx(q, path, verify_windows=verify)
        pipeline = q.quant_info["pipeline"]
        evaluate(
            f"edgequant-{key}",
            path,
            {
                "grid": label,
                "calibration_wall_s": calib_s,
                "steps": pipeline["steps"],
                "awq_mean_error_ratio": pipeline.get("decoder", {}).get("awq_mean_error_ratio"),
                "clip_mean_ratio": pipeline.get("decoder", {}).get("clip_mean_ratio"),
                "agreement": ex.agreement,
                "agreement_floor": ex.agreement_floor,
                "logit_distance": ex.logit_distance,
                "logit_distance_floor": ex.logit_distance_floor,
                "perplexity_floor": ex.perplexity_floor,
                "perplexity_simulated_verify": ex.perplexity_simulated,
                "perplexity_deployed_verify": ex.perplexity_deployed,
                "tied_table": ex.tied_table,
            },
        )
        for algo in args.peers.split(",") if args.peers else []:
            if group is None:
                continue  # MatMul4BitsQuantizer takes power-of-two blocks; 576 is not one
            path = folder / f"ort_{algo}_{key}.onnx"
            start = time.perf_counter()
            try:
                peer(fp32_path, path, algo, bits, group)
            except Exception as err:  # a peer that fails is reported, not hidden
                row(name=f"ort-{algo}-{key}", error=f"{type(err).__name__}: {err}"[:300])
                continue
            evaluate(
                f"ort-{algo}-{key}",
                path,
                {
                    "grid": label + (" (asymmetric: HQQ)" if algo == "hqq" else ""),
                    "calibration_wall_s": time.perf_counter() - start,
                    "note": "embedding and lm_head left in FP32 by the peer",
                },
            )

    if args.append:
        decode_again(args, layers, kv, hd)
        return
    record_decode(results, interleaved_decode(files, layers, kv, hd, args.rounds), args.rounds)
    save()


def record_decode(results: dict[str, Any], speeds: dict[str, list[float]], rounds: int) -> None:
    """Each row's median tokens/s and its ratio to FP32's, from one interleaved measurement."""
    fp32_speed = float(np.median(speeds["fp32"]))
    for r in results["rows"]:
        if r["name"] in speeds:
            r["tokens_per_s"] = float(np.median(speeds[r["name"]]))
            r["decode_vs_fp32"] = r["tokens_per_s"] / fp32_speed
            r["tokens_per_s_rounds"] = speeds[r["name"]]
    results["decode"] = (
        f"batch 1, 16 tokens after a 32-token prefill, ONNX Runtime 2 threads; median of "
        f"{rounds} interleaved rounds (every file in each round, rotating order); measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print({r["name"]: r.get("tokens_per_s") for r in results["rows"]}, flush=True)


def decode_again(args: argparse.Namespace, layers: int, kv: int, hd: int) -> None:
    """--decode-only: the files of a previous run's rows, timed again side by side."""
    import json

    results = json.loads(Path(args.out).read_text())
    folder = Path(args.models)
    files = {}
    for r in results["rows"]:
        name = r["name"]
        # The names main() gave the files: fp32, rtn_{grid}, edgequant_{grid}, ort_{algo}_{grid}.
        if name.startswith("edgequant-rtn-"):
            stem = "rtn_" + name.removeprefix("edgequant-rtn-")
        else:
            stem = name.replace("edgequant-", "edgequant_").replace("-", "_")
        path = folder / f"{stem}.onnx"
        # Only the file this row measured: present, no error recorded, the size it had.
        if "error" not in r and path.is_file() and path.stat().st_size == r.get("size_bytes"):
            files[name] = path
        else:
            for key in ("tokens_per_s", "decode_vs_fp32", "tokens_per_s_rounds"):
                r.pop(key, None)
    if "fp32" not in files:
        raise SystemExit(f"no fp32.onnx in {folder}: run the full benchmark first")
    record_decode(results, interleaved_decode(files, layers, kv, hd, args.rounds), args.rounds)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
