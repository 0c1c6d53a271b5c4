"""ResNet-20 W8A8 deployed to LiteRT / TFLite Micro by eq.export_tflite, plain calls.

Pretrained ResNet-20 of ../shared, `mcu-int8` W8A8, 512 calibration images of train_4660,
static PTQ with defaults; `eq.export_tflite` verifies the file on test_932 (every image) in
TFLite Micro and LiteRT's reference kernels against the integer reference. Reported: TFLite
Micro accuracy on test_932 (bar >= 91.4 %), bit-exact share and top-1 agreement with the
simulation (bars 1.000), LiteRT reference-kernel accuracy on the 10,000 JPEG images (bar >=
80.9 %; those kernels match TFLite Micro bit for bit, checked on test_932), LiteRT's default
(XNNPACK) path: accuracy, agreement with the simulation, and batch-1 latency beside the same
runtime's FP32 model converted by litert-torch, measured side by side; flash (.tflite bytes) and
TFLite Micro's arena.

    flock /tmp/edgequant-bench.lock python benchmarks/edge_resnet20.py \
        [--out benchmarks/results/edge_resnet20.json] [--quick]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _resnet20 import (  # benchmarks/_resnet20.py
    batch1_median_ms,
    edge_results,
    load_resnet20_cifar,
    predictions,
    quantize_mcu_int8,
    resnet20_parser,
)
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.export.tflite_runtime import TFLiteRunner, convert_program


def latency_ms(runner: TFLiteRunner, x: np.ndarray, repeats: int = 200) -> float:
    """Median batch-1 latency of runner on one image (after 20 warm-up runs)."""
    sample = [x[:1]]
    return batch1_median_ms(lambda: runner.run_int(sample), repeats)


def main() -> int:
    args = resnet20_parser(__doc__, "benchmarks/results/edge_resnet20.json").parse_args()
    if cifar_missing():
        return 0
    data = load_resnet20_cifar()
    model, x932, y932 = data.model, data.x932, data.y932
    work = Path(tempfile.mkdtemp(prefix="eq-edge-"))
    bars: dict[str, bool] = {}

    qmodel, head = quantize_mcu_int8(data)
    path = work / "resnet20.tflite"
    info = eq.export_tflite(qmodel, path, x932[:1], verify_data=list(x932.split(64)))
    print(info, flush=True)
    v = info.verification
    model_bytes = path.read_bytes()
    y = y932.numpy()
    x = x932.numpy()
    sim_pred = torch.cat([qmodel(b).argmax(1) for b in x932.split(256)]).numpy()

    tflm = TFLiteRunner(model_bytes, "tflite-micro", info.arena_bytes)
    start = time.perf_counter()
    tflm_pred = predictions(tflm, x)
    tflm_s = time.perf_counter() - start
    row: dict = {
        **head,
        "export_wall_s": info.wall_s,
        "sim_acc_test_932": float((sim_pred == y).mean()),
        "tflm_acc_test_932": float((tflm_pred == y).mean()),
        "tflm_top1_agreement_vs_sim_test_932": float((tflm_pred == sim_pred).mean()),
        "verification": v.__dict__,
        "flash_bytes": info.size_bytes,
        "tflm_arena_bytes": info.arena_bytes,
        "tflm_ms_per_image": 1000 * tflm_s / len(y),
        "ops": info.ops,
    }
    bars["TFLite Micro test_932 >= 91.4 %"] = row["tflm_acc_test_932"] >= 0.914
    bars["bit-exact vs the integer reference 1.000"] = v.bit_exact == 1.0
    bars["TFLite Micro top-1 agreement with the simulation 1.000"] = (
        row["tflm_top1_agreement_vs_sim_test_932"] == 1.0
    )

    litert = TFLiteRunner(model_bytes, "litert")
    litert_pred = predictions(litert, x)
    row["litert_xnnpack_acc_test_932"] = float((litert_pred == y).mean())
    row["litert_xnnpack_top1_agreement_vs_sim_test_932"] = float((litert_pred == sim_pred).mean())
    bars["LiteRT (XNNPACK) test_932 >= 91.4 %"] = row["litert_xnnpack_acc_test_932"] >= 0.914
    bars["LiteRT (XNNPACK) agreement >= 0.995"] = (
        row["litert_xnnpack_top1_agreement_vs_sim_test_932"] >= 0.995
    )

    # The same runtime's FP32 model, converted by the same converter, timed side by side.
    float_program = torch.export.export(model.eval(), (x932[:1],))
    float_bytes = convert_program(float_program, (x932[:1],), quantized=False)
    fp32 = TFLiteRunner(float_bytes, "litert")
    row["fp32_tflite_bytes"] = len(float_bytes)
    row["fp32_litert_acc_test_932"] = float((predictions(fp32, x) == y).mean())
    int8_ms, fp32_ms = [], []
    for _ in range(3):  # interleaved, so both see the same machine load
        int8_ms.append(latency_ms(litert, x))
        fp32_ms.append(latency_ms(fp32, x))
    row["litert_latency_ms_bs1"] = {"int8": min(int8_ms), "fp32": min(fp32_ms)}
    row["litert_speedup_vs_fp32_bs1"] = min(fp32_ms) / min(int8_ms)
    bars["LiteRT int8 >= 1.8x its FP32 at batch 1"] = row["litert_speedup_vs_fp32_bs1"] >= 1.8
    print(json.dumps(row), flush=True)

    if not args.quick:
        xj, yj = C.load_jpeg_test()
        ref = TFLiteRunner(model_bytes, "litert-ref")
        start = time.perf_counter()
        ref_pred = predictions(ref, xj.numpy())
        row["litert_ref_acc_jpeg_10000"] = float((ref_pred == yj.numpy()).mean())
        row["litert_ref_jpeg_wall_s"] = time.perf_counter() - start
        bars["JPEG 10,000 (LiteRT reference kernels) >= 80.9 %"] = (
            row["litert_ref_acc_jpeg_10000"] >= 0.809
        )
    out = edge_results("edge_resnet20", args.quick, row, bars, threads=1)
    write_json(args.out, out)
    print(json.dumps(bars, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
