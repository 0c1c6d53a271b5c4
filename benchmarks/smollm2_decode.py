"""SmolLM2-135M decode speed at batch 1 with the KV cache in ONNX Runtime: the FP32 file and the
INT4 g64 file of the plain weight-only call (defaults), both written by export_lm_onnx (the same
graph), timed side by side; where a decode step's time goes (ONNX Runtime's profiler, summed by
op type); peak memory of each in a fresh process (edgequant.bench.decode_speed).

    # build (no lock: quantizing and exporting are not timed)
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/smollm2_decode.py --build-only
    # measure (timed: under the bench lock)
    PYTHONPATH=$PWD flock /tmp/edgequant-bench.lock python benchmarks/smollm2_decode.py \
        --measure-only [--rounds 9] [--also old-fp32=/path/a.onnx --also old-int4=/path/b.onnx]

Calibration: the first --calib windows of 512 tokens of data/text/wikitext2_valid_tokenized.txt.
The quantized model is saved beside the files (int4_g64_model.pt) and reused by a later build.
Export verification: 2 windows of 256 tokens of Tiny Shakespeare (held out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import interleaved_rounds, write_json  # noqa: E402
from _smollm2 import cache_shape, int4_g64, load_or_skip  # noqa: E402
from smollm2_lm import interleaved_decode, kernels  # noqa: E402

import edgequant as eq  # noqa: E402


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The FP32 and INT4 files in --models, verified; what the build did."""
    from edgequant.examples.smollm2 import SHAKESPEARE_TEXT, calibration_batches, text_windows
    from edgequant.export.lm import export_lm_onnx

    loaded = load_or_skip()
    if loaded is None:
        raise SystemExit(0)
    model, tok = loaded
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = export_lm_onnx(model, folder / "fp32.onnx", quantized=False)
    saved = folder / "int4_g64_model.pt"
    built: dict[str, Any] = {"fp32": {"size_bytes": fp32.size_bytes, "notes": fp32.notes}}
    if saved.is_file():
        q = torch.load(saved, weights_only=False)
        built["calibration"] = f"reused {saved.name} (the same plain call, saved by a build)"
    else:
        calib = calibration_batches(tok, 512, args.calib, 4)
        start = time.perf_counter()
        q = eq.quantize(model, int4_g64(), calib_data=calib, method="weight_only", progress=True)
        built["calibration_wall_s"] = time.perf_counter() - start
        torch.save(q, saved)
    pipeline = q.quant_info["pipeline"]
    verify = text_windows(tok, SHAKESPEARE_TEXT, 256, 2)
    info = export_lm_onnx(q, folder / "int4_g64.onnx", verify_windows=verify)
    built["int4_g64"] = {
        "call": "eq.quantize(model, Recipe(weight=weight_spec(4, 64), activation=None, "
        f"first_last_bits=8), calib_data={args.calib} x 512 tokens, method='weight_only')",
        "steps": pipeline["steps"],
        "block_int8_layers": pipeline.get("block_int8_layers"),
        "size_bytes": info.size_bytes,
        "size_ratio": info.size_bytes / fp32.size_bytes,
        "matmul_nbits_layers": info.matmul_nbits,
        "agreement": info.agreement,
        "perplexity_deployed_verify": info.perplexity_deployed,
        "perplexity_simulated_verify": info.perplexity_simulated,
        "notes": info.notes,
    }
    write_json(folder / "build.json", built)
    layers, kv, hd = cache_shape(model)
    write_json(folder / "config.json", {"layers": layers, "kv_heads": kv, "head_dim": hd})
    return built


def profile(path: Path, layers: int, kv: int, hd: int, steps: int = 16) -> dict[str, Any]:
    """One session's decode steps (after a 32-token prefill) under ONNX Runtime's profiler: the
    kernels' time per step summed by op type, and the whole run per step."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs = ["logits"] + [f"present_{k}_{i}" for i in range(layers) for k in ("key", "value")]
        names = [f"past_{k}_{i}" for i in range(layers) for k in ("key", "value")]
        feeds = {n: np.zeros((1, kv, 0, hd), np.float32) for n in names}
        feeds["input_ids"] = np.arange(32, dtype=np.int64).reshape(1, -1)
        out = session.run(outs, feeds)
        for _ in range(steps):
            feeds = dict(zip(names, out[1:], strict=True))
            feeds["input_ids"] = np.array([[int(out[0][0, -1].argmax())]], dtype=np.int64)
            out = session.run(outs, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]
    by_op: dict[str, float] = defaultdict(float)
    count = 0
    for e in events:
        node = e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
        if node and any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in runs):
            by_op[e["args"]["op_name"]] += e["dur"] / 1000 / len(runs)
            count += 1
    return {
        "run_ms_per_step": float(np.mean([r["dur"] for r in runs])) / 1000,
        "kernels_per_step": count / len(runs),
        "kernel_ms_per_step_by_op": dict(sorted(by_op.items(), key=lambda kv_: -kv_[1])),
    }


def cpu_ms_per_token(
    files: dict[str, Path], layers: int, kv: int, hd: int, rounds: int, threads: int
) -> dict[str, list[float]]:
    """CPU time of the process per decoded token (all its threads, time.process_time), each
    file's session with `threads` threads that sleep rather than spin when idle, in interleaved
    rounds: on a machine shared with other jobs, a figure their load moves much less than wall
    time (ONNX Runtime's spinning threads would count their waiting as work)."""
    import onnxruntime as ort

    names = [f"past_{k}_{i}" for i in range(layers) for k in ("key", "value")]
    outs = ["logits"] + [n.replace("past_", "present_") for n in names]

    def clock(session: Any) -> float:
        feeds = {n: np.zeros((1, kv, 0, hd), np.float32) for n in names}
        feeds["input_ids"] = np.arange(32, dtype=np.int64).reshape(1, -1)
        out = session.run(outs, feeds)  # the prefill, not counted
        start = time.process_time()
        for _ in range(16):
            feeds = dict(zip(names, out[1:], strict=True))
            feeds["input_ids"] = np.array([[int(out[0][0, -1].argmax())]], dtype=np.int64)
            out = session.run(outs, feeds)
        return (time.process_time() - start) * 1000 / 16

    sessions = {}
    for name, path in files.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        clock(sessions[name])  # warm-up
    return interleaved_rounds({n: partial(clock, s) for n, s in sessions.items()}, rounds)


def measure(args: argparse.Namespace, built: dict[str, Any]) -> dict[str, Any]:
    """Interleaved decode speed, profiles and peak memory of the files."""
    from edgequant.bench import decode_speed

    cfg = json.loads((Path(args.models) / "config.json").read_text())
    layers, kv, hd = cfg["layers"], cfg["kv_heads"], cfg["head_dim"]
    folder = Path(args.models)
    files = {"fp32": folder / "fp32.onnx", "int4-g64": folder / "int4_g64.onnx"}
    for extra in args.also:
        name, _, path = extra.partition("=")
        files[name] = Path(path)
    start_load = os.getloadavg()[0]
    speeds = interleaved_decode(files, layers, kv, hd, args.rounds)
    fp32_speed = float(np.median(speeds["fp32"]))
    cpu = {t: cpu_ms_per_token(files, layers, kv, hd, args.rounds, t) for t in (1, 2)}
    rows = []
    for name, path in files.items():
        memory = decode_speed(path, runs=3, threads=2)
        rows.append(
            {
                "name": name,
                "file": path.name,
                "size_bytes": path.stat().st_size,
                "tokens_per_s": float(np.median(speeds[name])),
                "decode_vs_fp32": float(np.median(speeds[name])) / fp32_speed,
                "tokens_per_s_rounds": speeds[name],
                "cpu_ms_per_token": {
                    f"threads_{t}": float(np.median(c[name])) for t, c in cpu.items()
                },
                "cpu_vs_fp32": {
                    f"threads_{t}": float(np.median(c["fp32"]) / np.median(c[name]))
                    for t, c in cpu.items()
                },
                "peak_memory_bytes": memory["peak_memory_bytes"],
                "fresh_process_tokens_per_s": memory["tokens_per_s"],
                "kernels": kernels(path),
                "profile": profile(path, layers, kv, hd),
            }
        )
        print({k: v for k, v in rows[-1].items() if k != "tokens_per_s_rounds"}, flush=True)
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to FP32)",
        "decode": f"batch 1, 16 tokens after a 32-token prefill, ONNX Runtime 2 threads, plain "
        f"session.run loop feeding the 60 KV tensors back (numpy); median of {args.rounds} "
        "interleaved rounds (every file each round, rotating order)",
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": {"start": start_load, "end": os.getloadavg()[0]},
        "cpu_time": "cpu_ms_per_token: the decoding process's CPU time per token (all threads; "
        "ONNX Runtime threads sleeping rather than spinning), median of the same number of "
        "interleaved rounds, at 1 and 2 intra-op threads; cpu_vs_fp32: FP32's over the file's",
        "peak_memory": "edgequant.bench.decode_speed: a fresh process's peak RSS while the "
        "session loads and decodes, above what it held after importing ONNX Runtime",
        "profile": "ONNX Runtime profiler, 16 decode steps of one session; per-kernel times "
        "are wall time on the shared machine",
        "build": built,
        "environment": {"onnxruntime": __import__("onnxruntime").__version__},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    paths = {"--models": "/tmp/smollm2_decode", "--out": "benchmarks/results/smollm2_decode.json"}
    for flag, default in paths.items():
        parser.add_argument(flag, default=default)
    for flag, count in (("--calib", 32), ("--rounds", 9)):
        parser.add_argument(flag, type=int, default=count)
    for flag in ("--build-only", "--measure-only"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        help="NAME=PATH: another file of the same model to time beside them (e.g. an older export)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.models)
    if not args.measure_only:
        build(args)
    if args.build_only:
        return
    built = json.loads((folder / "build.json").read_text())
    write_json(args.out, measure(args, built))


if __name__ == "__main__":
    main()
