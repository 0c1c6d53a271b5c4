"""One MatMulNBits node at a time in ONNX Runtime (CPU, 2 threads, batch 1 = one token): the
default accuracy level (float inputs) against accuracy_level=4 (inputs rounded to int8 per block)
against an FP32 MatMul of the same shape, for SmolLM2-135M's layer shapes. Random symmetric
weights; only the speed is measured here (the numerics are tested in tests/export/).

    PYTHONPATH=$PWD flock /tmp/edgequant-bench.lock python benchmarks/matmul_nbits_levels.py \
        [--rounds 7] [--out benchmarks/results/matmul_nbits_levels.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import interleaved_rounds, timed, write_json  # noqa: E402

# (name, K, N, bits, block): SmolLM2-135M's Linear shapes (q/o 576x576, gate/up 576x1536,
# down 1536x576) at 4 bits, group 64, and the tied lm_head (576 x 49,152) at 8 bits per row
# (MatMulNBits blocks of 64).
SHAPES = [
    ("q_proj 576x576 int4 g64", 576, 576, 4, 64),
    ("up_proj 576x1536 int4 g64", 576, 1536, 4, 64),
    ("down_proj 1536x576 int4 g64", 1536, 576, 4, 64),
    ("lm_head 576x49152 int8 b64", 576, 49152, 8, 64),
]


def nbits_model(k: int, n: int, bits: int, block: int, level: int | None, seed: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    blocks = k // block
    high = 2**bits
    codes = rng.integers(0, high, size=(n, blocks, block), dtype=np.uint8)
    data = codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes
    scales = rng.uniform(0.001, 0.01, size=(n * blocks,)).astype(np.float32)
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block}
    if level is not None:
        attrs["accuracy_level"] = level
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])],
        [
            numpy_helper.from_array(data.astype(np.uint8), "w"),
            numpy_helper.from_array(scales, "s"),
        ],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )


def matmul_model(k: int, n: int, seed: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/matmul_nbits_levels.json")
    args = parser.parse_args()
    import onnxruntime

    rows = []
    for name, k, n, bits, block in SHAPES:
        x = {"x": np.random.default_rng(1).standard_normal((1, 1, k)).astype(np.float32)}
        sessions = {
            "fp32_matmul": session(matmul_model(k, n, 0)),
            "nbits_level0": session(nbits_model(k, n, bits, block, None, 0)),
            "nbits_level4": session(nbits_model(k, n, bits, block, 4, 0)),
        }
        calls = max(3, args.calls // (10 if n > 10000 else 1))
        measures = {}
        for key, s in sessions.items():
            s.run(None, x)  # warm-up

            def one(s: Any = s, x: dict[str, np.ndarray] = x) -> None:
                s.run(None, x)

            measures[key] = timed(one, calls)
        times = interleaved_rounds(measures, args.rounds)
        med = {key: float(np.median(v)) * 1e3 for key, v in times.items()}
        row = {
            "layer": name,
            "K": k,
            "N": n,
            "bits": bits,
            "block": block,
            "ms": med,
            "level4_speedup_vs_level0": med["nbits_level0"] / med["nbits_level4"],
            "level4_speedup_vs_fp32": med["fp32_matmul"] / med["nbits_level4"],
            "level0_speedup_vs_fp32": med["fp32_matmul"] / med["nbits_level0"],
            "calls_per_round": calls,
        }
        rows.append(row)
        print(row, flush=True)
    write_json(
        args.out,
        {
            "what": "one node, batch 1 (M=1), ONNX Runtime CPU, 2 threads; median over "
            f"{args.rounds} interleaved rounds of the mean call time",
            "environment": {
                "onnxruntime": onnxruntime.__version__,
                "cpu": platform.processor() or platform.machine(),
                "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_average_end": os.getloadavg()[0],
            },
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
