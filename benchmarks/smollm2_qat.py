"""QAT for SmolLM2-135M at symmetric INT3, group 64: how much of the PTQ -> FP32 perplexity gap
distillation closes, every model measured as deployed (the exported ONNX file in ONNX Runtime).

    PYTHONPATH=$PWD flock /tmp/edgequant-bench.lock python benchmarks/smollm2_qat.py \
        [--train 48] [--epochs 1] [--windows 64] [--out benchmarks/results/smollm2_qat.json]

The plain calls with their defaults: eq.prepare_qat(model, recipe, calib_data=...) starts from
the weight-only PTQ model (the decoder pipeline: AWQ, clipping search, GPTQ), then
eq.fit_qat(q, train, epochs=..., teacher=model, val_data=held_out) distils the FP32 model's
next-token distributions and keeps an epoch only where the held-out perplexity falls by more
than noise. Text: wikitext2_valid_tokenized.txt windows of 512 tokens: the first --calib
calibrate, the next --train train, the next --heldout choose the epoch; perplexity on the first
--windows x 512 tokens of wikitext2_raw_test.txt (never trained or chosen on). Export
verification: 2 x 256 tokens of Tiny Shakespeare. --smoke: tiny counts, short windows, to check
the script runs (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402
from _smollm2 import cache_shape, load_or_skip  # noqa: E402
from smollm2_lm import ort_perplexity  # noqa: E402

import edgequant as eq  # noqa: E402
from edgequant.spec import weight_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/smollm2_qat.json")
    parser.add_argument("--models", default="/tmp/smollm2_qat_models")
    args = parser.parse_args()
    if args.smoke:
        args.calib, args.train, args.heldout, args.windows, args.seq_len = 2, 3, 2, 2, 128
        args.out = args.out.replace(".json", "_smoke.json")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    import onnxruntime

    from edgequant.examples.smollm2 import (
        SHAKESPEARE_TEXT,
        TEST_TEXT,
        VALID_TEXT,
        text_windows,
    )
    from edgequant.export.lm import export_lm_onnx
    from edgequant.qat import finalize

    loaded = load_or_skip()
    if loaded is None:
        return
    model, tok = loaded
    shape = cache_shape(model)
    seq = args.seq_len
    valid = text_windows(tok, VALID_TEXT, seq, args.calib + args.train + args.heldout)
    calib = [{"input_ids": w.reshape(1, -1)} for w in valid[: args.calib]]
    train = [{"input_ids": w.reshape(1, -1)} for w in valid[args.calib : args.calib + args.train]]
    held = [{"input_ids": w.reshape(1, -1)} for w in valid[args.calib + args.train :]]
    test = text_windows(tok, TEST_TEXT, seq, args.windows)
    verify = text_windows(tok, SHAKESPEARE_TEXT, 256 if not args.smoke else 64, 2)
    recipe = eq.Recipe(
        name=f"int{args.bits}-g{args.group}",
        weight=weight_spec(args.bits, args.group),
        activation=None,
        first_last_bits=8,
    )
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to FP32)",
        "grid": f"symmetric INT{args.bits}, group {args.group} (embedding / lm_head 8-bit, tied)",
        "metric": "perplexity (lower is better), non-overlapping windows, deployed in ONNX Runtime",
        "test_windows": f"first {args.windows} x {seq} tokens of wikitext2_raw_test.txt",
        "calibration": f"first {args.calib} x {seq} tokens of wikitext2_valid_tokenized.txt",
        "training": f"the next {args.train} x {seq} tokens (distillation from FP32 logits)",
        "held_out": f"the next {args.heldout} x {seq} tokens (choose the epoch kept)",
        "smoke": args.smoke,
        "environment": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        },
        "rows": {},
    }

    def deployed(name: str, lm: torch.nn.Module, quantized: bool, **extra: Any) -> float:
        path = folder / f"{name}.onnx"
        start = time.perf_counter()
        info = export_lm_onnx(
            lm, path, verify_windows=verify if quantized else None, quantized=quantized
        )
        ppl = ort_perplexity(path, test, *shape)
        results["rows"][name] = {
            "perplexity_deployed": ppl,
            "size_bytes": path.stat().st_size,
            "next_token_agreement": info.agreement,
            "export_and_eval_wall_s": time.perf_counter() - start,
            **extra,
        }
        write_json(args.out, results)
        print(f"{name}: perplexity {ppl:.3f}", flush=True)
        return ppl

    fp32 = deployed("fp32", model, quantized=False)
    start = time.perf_counter()
    q = eq.prepare_qat(model, recipe, calib_data=calib, progress=True)
    prepare_s = time.perf_counter() - start
    ptq = deployed(
        "ptq",
        finalize(q),
        quantized=True,
        prepare_wall_s=prepare_s,
        pipeline=q.quant_info["pipeline"].get("steps"),
    )
    start = time.perf_counter()
    history = eq.fit_qat(q, train, epochs=args.epochs, teacher=model, val_data=held)
    fit_s = time.perf_counter() - start
    chosen = q.quant_info["qat_selection"]
    qat = deployed(
        "qat",
        finalize(q),
        quantized=True,
        fit_wall_s=fit_s,
        history=history,
        selection={k: v for k, v in chosen.items() if k != "rule"},
    )
    gap = ptq - fp32
    results["gap_closed"] = (ptq - qat) / gap if gap > 0 else None
    results["summary"] = (
        f"FP32 {fp32:.3f}, PTQ {ptq:.3f} ({ptq / fp32:.3f}x), QAT {qat:.3f} ({qat / fp32:.3f}x): "
        f"QAT closes {100 * results['gap_closed']:.1f} % of the PTQ gap"
        if gap > 0
        else f"FP32 {fp32:.3f}, PTQ {ptq:.3f}, QAT {qat:.3f}: no PTQ gap"
    )
    write_json(args.out, results)
    print(results["summary"], flush=True)


if __name__ == "__main__":
    main()
