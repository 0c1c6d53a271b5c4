"""ResNet-20 W8A8 deployed to ExecuTorch (XNNPACK) by eq.export_executorch, plain calls.

Pretrained ResNet-20 of ../shared, `mcu-int8` W8A8 (the model benchmarks/edge_resnet20.py writes
to a .tflite), 512 calibration images of train_4660, static PTQ with defaults;
`eq.export_executorch(qmodel, path, x932[:1], verify_data=test_932 in batches of 64)`, which
runs every image in ExecuTorch's runtime against the simulation before writing. Reported:
accuracy of the written .pte in ExecuTorch on test_932 (bar >= 91.4 %) and on the 10,000 JPEG
images, top-1 agreement with the simulation (bar >= 0.995) and SQNR, and batch-1 latency beside
the same runtime's FP32 .pte (the float model lowered to XNNPACK by the same ExecuTorch, both
as eq.export_executorch lowers and with every partitioner config; the bar reads the faster),
one thread, interleaved, best of 3 medians of 200 runs (bar >= 1.8x).

    flock /tmp/edgequant-bench.lock python benchmarks/edge_executorch_resnet20.py \
        [--out benchmarks/results/edge_executorch_resnet20.json] [--quick]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _resnet20 import (  # benchmarks/_resnet20.py
    batch1_median_ms,
    best_latency_ms,
    edge_results,
    eval_sets,
    load_resnet20_cifar,
    predictions,
    quantize_mcu_int8,
    resnet20_parser,
)
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.export.executorch import ExecuTorchRunner, lower_to_executorch


def latency_ms(runner: ExecuTorchRunner, x: np.ndarray, repeats: int = 200) -> float:
    """Median batch-1 latency of the program's forward on one image (after 20 warm-up runs)."""
    sample = [torch.from_numpy(x[:1])]
    return batch1_median_ms(lambda: runner.method.execute(sample), repeats)


def main() -> int:
    args = resnet20_parser(__doc__, "benchmarks/results/edge_executorch_resnet20.json").parse_args()
    if cifar_missing():
        return 0
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(1)  # XNNPACK's threadpool: one thread, as LiteRT's
    data = load_resnet20_cifar(threads=1)
    model, x932, y932 = data.model, data.x932, data.y932
    sets = eval_sets(data, args.quick)
    work = Path(tempfile.mkdtemp(prefix="eq-edge-et-"))
    bars: dict[str, bool] = {}

    qmodel, head = quantize_mcu_int8(data)
    path = work / "resnet20.pte"
    info = eq.export_executorch(qmodel, path, x932[:1], verify_data=list(x932.split(64)))
    print(info, flush=True)
    v = info.verification
    runner = ExecuTorchRunner(path.read_bytes())
    row: dict = {
        **head,
        "export_wall_s": info.wall_s,
        "verification": v.__dict__,
        "pte_bytes": info.size_bytes,
        "ops": info.ops,
    }
    for set_name, (x, y) in sets.items():
        with torch.no_grad():
            sim = np.concatenate(
                [
                    qmodel(torch.from_numpy(x[i : i + 256])).argmax(1).numpy()
                    for i in range(0, len(x), 256)
                ]
            )
        pred = predictions(runner, x)
        row[f"sim_acc_{set_name}"] = float((sim == y).mean())
        row[f"executorch_acc_{set_name}"] = float((pred == y).mean())
        row[f"executorch_top1_agreement_vs_sim_{set_name}"] = float((pred == sim).mean())
    bars["ExecuTorch test_932 >= 91.4 %"] = row["executorch_acc_test_932"] >= 0.914
    bars["ExecuTorch agreement with the simulation >= 0.995"] = (
        row["executorch_top1_agreement_vs_sim_test_932"] >= 0.995
    )

    # The same runtime's FP32 programs, timed side by side: the float model lowered as
    # eq.export_executorch lowers (constant pad kept out of XNNPACK), and with every XNNPACK
    # partitioner config (the pad delegated too). The bar is read against the faster one.
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    float_program = torch.export.export(model.eval(), (x932[:1],))
    full = to_edge_transform_and_lower(
        torch.export.export(model.eval(), (x932[:1],)), partitioner=[XnnpackPartitioner()]
    )
    fp32s = {
        "fp32": ExecuTorchRunner(lower_to_executorch(float_program)),
        "fp32_all_configs": ExecuTorchRunner(bytes(full.to_executorch().buffer)),
    }
    x = x932.numpy()
    for name, fp32 in fp32s.items():
        row[f"{name}_executorch_acc_test_932"] = float(
            (predictions(fp32, x) == y932.numpy()).mean()
        )
    best = best_latency_ms({"int8": runner, **fp32s}, latency_ms, x)
    row["executorch_latency_ms_bs1"] = best
    fastest_fp32 = min(best[name] for name in fp32s)
    row["executorch_speedup_vs_fp32_bs1"] = fastest_fp32 / best["int8"]
    row["executorch_speedup_vs_each_fp32_bs1"] = {name: best[name] / best["int8"] for name in fp32s}
    bars["ExecuTorch int8 >= 1.8x its FP32 at batch 1"] = (
        row["executorch_speedup_vs_fp32_bs1"] >= 1.8
    )
    threads = portable_lib._threadpool_get_thread_count()
    out = edge_results("edge_executorch_resnet20", args.quick, row, bars, threads)
    write_json(args.out, out)
    print(json.dumps(row, default=str), flush=True)
    print(json.dumps(bars, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
