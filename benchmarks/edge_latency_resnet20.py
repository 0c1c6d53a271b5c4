"""ResNet-20 W8A8 against the same runtime's FP32 model at batch 1, on 1 and 2 threads: LiteRT
(its default path, XNNPACK) and ExecuTorch (XNNPACK), measured side by side in one process.

Ours: the plain calls (`eq.quantize` W8A8 for `mcu-int8` with 512 calibration images of
train_4660, then `eq.export_tflite` and `eq.export_executorch`, each verified on its example
image). FP32: the float model converted by the same converter (litert-torch) and lowered by the
same `lower_to_executorch` (ExecuTorch: also with every XNNPACK partitioner config; the faster
FP32 program is the one compared). For each thread count the four files are timed interleaved,
best of 3 medians of 200 runs. LiteRT is also timed without its default delegate
(BUILTIN_WITHOUT_DEFAULT_DELEGATES: TFLite's own optimized kernels), which says whether XNNPACK
is what runs the int8 ops, and how many delegate partitions each file gets.

    OMP_NUM_THREADS=1 flock /tmp/edgequant-bench.lock python benchmarks/edge_latency_resnet20.py \
        [--out benchmarks/results/edge_latency_resnet20.json]
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _resnet20 import (  # benchmarks/_resnet20.py
    batch1_median_ms,
    load_resnet20_cifar,
    quantize_mcu_int8,
    resnet20_parser,
)
from _results import cifar_missing, cpu_description, write_json  # benchmarks/_results.py

import edgequant as eq
from edgequant.export.executorch import ExecuTorchRunner, lower_to_executorch
from edgequant.export.tflite_runtime import convert_program, quantize_input

THREADS = (1, 2)


def litert_call(model: bytes, x: np.ndarray, threads: int, delegate: bool) -> tuple[Any, int]:
    """A batch-1 invoke of LiteRT on `model` (default XNNPACK delegate or none), and how many
    nodes its execution plan has (a delegated partition is one node)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=model, experimental_op_resolver_type=kind, num_threads=threads)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    sample = x[:1] if d["dtype"] == np.float32 else quantize_input(x[:1], *d["quantization"])
    it.set_tensor(d["index"], sample.astype(d["dtype"]))

    def run() -> None:
        it.invoke()

    return run, len(it._get_ops_details())


def executorch_call(runner: ExecuTorchRunner, x: np.ndarray) -> Callable[[], Any]:
    """A batch-1 forward of the program on the first image."""
    sample = [torch.from_numpy(x[:1])]
    return lambda: runner.method.execute(sample)


def main() -> int:
    args = resnet20_parser(__doc__, "benchmarks/results/edge_latency_resnet20.json").parse_args()
    if cifar_missing():
        return 0
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings import portable_lib

    data = load_resnet20_cifar(threads=1)
    model, x932 = data.model.eval(), data.x932
    work = Path(tempfile.mkdtemp(prefix="eq-edge-latency-"))
    qmodel, head = quantize_mcu_int8(data)
    tfl = eq.export_tflite(qmodel, work / "resnet20.tflite", x932[:1])
    pte = eq.export_executorch(qmodel, work / "resnet20.pte", x932[:1])
    print(tfl, pte, sep="\n", flush=True)
    one = (x932[:1],)
    files = {
        "litert_int8": (work / "resnet20.tflite").read_bytes(),
        "litert_fp32": convert_program(torch.export.export(model, one), one, quantized=False),
        "executorch_int8": (work / "resnet20.pte").read_bytes(),
        "executorch_fp32": lower_to_executorch(torch.export.export(model, one)),
        "executorch_fp32_all_configs": bytes(
            to_edge_transform_and_lower(
                torch.export.export(model, one), partitioner=[XnnpackPartitioner()]
            )
            .to_executorch()
            .buffer
        ),
    }
    x = x932.numpy()
    row: dict[str, Any] = {**head, "file_bytes": {k: len(v) for k, v in files.items()}}
    for threads in THREADS:
        portable_lib._unsafe_reset_threadpool(threads)  # before the programs load
        calls: dict[str, Callable[[], Any]] = {}
        plan_nodes = {}
        for name in ("litert_int8", "litert_fp32"):
            for delegate in (True, False):
                key = name if delegate else f"{name}_no_delegate"
                calls[key], plan_nodes[key] = litert_call(files[name], x, threads, delegate)
        runners = {}
        for name in ("executorch_int8", "executorch_fp32", "executorch_fp32_all_configs"):
            runners[name] = ExecuTorchRunner(files[name])
            calls[name] = executorch_call(runners[name], x)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(3):  # interleaved: every file sees the same machine load
            for key, call in calls.items():
                times[key].append(batch1_median_ms(call))
        best = {k: min(v) for k, v in times.items()}
        et_fp32 = min(best["executorch_fp32"], best["executorch_fp32_all_configs"])
        row[f"threads_{threads}"] = {
            "latency_ms_bs1": best,
            "litert_int8_speedup_vs_fp32": best["litert_fp32"] / best["litert_int8"],
            "litert_int8_speedup_vs_fp32_no_delegate": (
                best["litert_fp32_no_delegate"] / best["litert_int8_no_delegate"]
            ),
            "litert_int8_xnnpack_vs_builtin_kernels": (
                best["litert_int8_no_delegate"] / best["litert_int8"]
            ),
            "executorch_int8_speedup_vs_fp32": et_fp32 / best["executorch_int8"],
            "litert_execution_plan_nodes": plan_nodes,
            "executorch_threadpool": portable_lib._threadpool_get_thread_count(),
        }
        print(threads, json.dumps(row[f"threads_{threads}"], indent=1), flush=True)
    bars = {
        f"{rt} int8 >= 1.8x its FP32 at batch 1, {t} thread(s)": row[f"threads_{t}"][
            f"{rt}_int8_speedup_vs_fp32"
        ]
        >= 1.8
        for rt in ("litert", "executorch")
        for t in THREADS
    }
    out = {
        "benchmark": "edge_latency_resnet20",
        "command": "python benchmarks/edge_latency_resnet20.py",
        "results": row,
        "bars": bars,
        "environment": {
            "torch": torch.__version__,
            "cpu": cpu_description(),
            "cores": __import__("os").cpu_count(),
        },
    }
    write_json(args.out, out)
    print(json.dumps(bars, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
