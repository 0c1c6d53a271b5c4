"""SmolLM2-135M decode speed with the lm_head as MatMulNBits at accuracy_level=4 (the default,
Recipe.block_int8_inputs) against the same file with that switch off, and the FP32 file: each
exported from a plain weight-only call (symmetric INT4 group 64, 8-bit lm_head / embedding; no
calib_data, so round to nearest: the decode speed depends on the file's ops, not on how its
weights were rounded), verified against the simulation on 2 x 256 held-out Shakespeare tokens,
then timed side by side (batch 1, 16 tokens after a 32-token prefill, 2 threads, interleaved).

    PYTHONPATH=$PWD flock /tmp/edgequant-bench.lock python benchmarks/smollm2_decode_head.py \
        [--rounds 9] [--models /tmp/smollm2_models] [--out benchmarks/results/smollm2_decode_head.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402
from _smollm2 import cache_shape, int4_g64, load_with_windows  # noqa: E402
from smollm2_lm import interleaved_decode  # noqa: E402

import edgequant as eq  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--models", default="/tmp/smollm2_models")
    parser.add_argument("--out", default="benchmarks/results/smollm2_decode_head.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import onnxruntime

    from edgequant.export.lm import export_lm_onnx

    loaded = load_with_windows()
    if loaded is None:
        return
    model, _, verify = loaded
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"fp32": folder / "fp32.onnx"}
    info = export_lm_onnx(model, files["fp32"], quantized=False)
    rows: list[dict[str, Any]] = [{"name": "fp32", "size_bytes": info.size_bytes}]
    for name, switch in (("int4-g64-head-level4", None), ("int4-g64-switch-off", False)):
        q = eq.quantize(model, int4_g64(block_int8_inputs=switch), method="weight_only")
        pipeline = q.quant_info["pipeline"]
        path = folder / f"{name}.onnx"
        ex = export_lm_onnx(q, path, verify_windows=verify)
        files[name] = path
        rows.append(
            {
                "name": name,
                "call": "eq.quantize(model, Recipe(weight=weight_spec(4, 64), activation=None, "
                f"first_last_bits=8, block_int8_inputs={switch}), method='weight_only')",
                "block_int8_inputs": pipeline["block_int8_inputs"],
                "reason": pipeline["reasons"]["block_int8_inputs"],
                "agreement": ex.agreement,
                "perplexity_deployed_verify": ex.perplexity_deployed,
                "perplexity_simulated_verify": ex.perplexity_simulated,
                "size_bytes": ex.size_bytes,
            }
        )
        print(rows[-1], flush=True)
    speeds = interleaved_decode(files, *cache_shape(model), args.rounds)
    fp32 = float(np.median(speeds["fp32"]))
    for r in rows:
        r["tokens_per_s"] = float(np.median(speeds[r["name"]]))
        r["decode_vs_fp32"] = r["tokens_per_s"] / fp32
        r["tokens_per_s_rounds"] = speeds[r["name"]]
    print({r["name"]: (r["tokens_per_s"], r["decode_vs_fp32"]) for r in rows}, flush=True)
    write_json(
        args.out,
        {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to FP32)",
            "verification": "2 x 256 tokens of tinyshakespeare.txt",
            "decode": f"batch 1, 16 tokens after a 32-token prefill, ONNX Runtime 2 threads; "
            f"median of {args.rounds} interleaved rounds; measured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
            f"{os.getloadavg()[0]:.1f} at the end",
            "environment": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
