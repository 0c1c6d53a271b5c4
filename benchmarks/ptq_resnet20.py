"""Issue 2's figures: PTQ of the pretrained ResNet-20 on CIFAR-10, side by side with ONNX Runtime's
own quantize_static, on the same model and the same 512 calibration images of train_4660.

Every accuracy is that of the exported ONNX model run in ONNX Runtime, on test_932 (exact pixels)
and on the 10,000 JPEG test images. Latency: median over interleaved runs, 2 threads.

    python benchmarks/ptq_resnet20.py [--out benchmarks/results/ptq_resnet20.json] [--quick]
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _resnet20 import (  # benchmarks/_resnet20.py
    eval_sets,
    evaluate_onnx,
    load_resnet20_cifar,
    ort_quantize_static,
    resnet20_parser,
)
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant import bench
from edgequant.examples import cifar10 as C
from edgequant.export.int8_kernels import INT8_CPU_FLAGS, cpu_int8_flags
from edgequant.functional import sqnr_db


def cpu_flags() -> str:
    """The x86 features that decide ONNX Runtime's 8-bit kernels (VNNI: no saturation)."""
    flags = cpu_int8_flags()
    if flags is None:
        return "unknown"
    return " ".join(f for f in INT8_CPU_FLAGS if f in flags) or "none of avx2/avx512/vnni"


def as_int8_weights(src: Path, dst: Path) -> int:
    """Our export with its uint8 weights (zero point 128) stored back as int8 (zero point 0):
    the same values, the format before 2026-12-04, which ONNX Runtime runs in its u8s8 kernel.
    Returns how many weights were rewritten. (Not export_onnx(weight_storage="int8"): that file
    is verified, and on a CPU without VNNI, where this measures what saturation costs, it is
    refused.)"""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    weights, zero_points = set(), set()  # zero points may be shared between layers: collect first
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        w, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if w is None or zp is None or len(w.dims) < 2 or w.data_type != onnx.TensorProto.UINT8:
            continue
        if (numpy_helper.to_array(zp) == 128).all():
            weights.add(w.name)
            zero_points.add(zp.name)
    for name in weights:
        values = numpy_helper.to_array(inits[name]).astype(np.int16) - 128
        inits[name].CopyFrom(numpy_helper.from_array(values.astype(np.int8), name))
    for name in zero_points:
        shape = numpy_helper.to_array(inits[name]).shape
        inits[name].CopyFrom(numpy_helper.from_array(np.zeros(shape, np.int8), name))
    count = len(weights)
    onnx.save(model, str(dst))
    return count


def main() -> int:
    parser = resnet20_parser(
        __doc__,
        "benchmarks/results/ptq_resnet20.json",
        quick_help="skip the JPEG test set and use fewer latency runs",
    )
    parser.add_argument("--runs", type=int, default=40, help="latency runs per batch size")
    args = parser.parse_args()
    if cifar_missing():
        return 0
    data = load_resnet20_cifar()
    model, x_cal, calib, x932, y932 = data.model, data.x_cal, data.calib, data.x932, data.y932
    test_sets = eval_sets(data, args.quick)
    work = Path(tempfile.mkdtemp(prefix="eq-bench-"))
    results: dict[str, dict] = {}

    def evaluate(name: str, path: Path, extra: dict) -> None:
        evaluate_onnx(results, name, path, test_sets, extra)

    fp32 = work / "fp32.onnx"
    torch.onnx.export(
        model.eval(),
        (x932[:1],),
        str(fp32),
        dynamo=True,
        opset_version=21,
        external_data=False,
        dynamic_shapes=({0: torch.export.Dim.AUTO},),
    )
    evaluate("fp32", fp32, {"torch_acc_test_932": C.accuracy(model, x932, y932)})

    ort_path = work / "ort_static_w8a8.onnx"
    wall = ort_quantize_static(fp32, ort_path, x_cal.numpy())
    evaluate(
        "onnxruntime quantize_static w8a8 (MinMax, per-channel, QDQ)", ort_path, {"wall_s": wall}
    )
    # ONNX Runtime's own advice against u8s8 saturation on x86 without VNNI: uint8 weights.
    ort_u8_path = work / "ort_static_w8a8_u8.onnx"
    wall = ort_quantize_static(fp32, ort_u8_path, x_cal.numpy(), weight_type="uint8")
    evaluate(
        "onnxruntime quantize_static w8a8, uint8 weights (QUInt8)", ort_u8_path, {"wall_s": wall}
    )

    runs = [
        ("edgequant static w8a8", "w8a8", "static"),
        # 7-bit weights (|w| <= 64) cannot saturate a u8s8 kernel, so they stay INT8 and run in
        # ONNX Runtime's fast kernel: its reduce_range, as a recipe.
        ("edgequant static w7a8 (INT8 weights, u8s8 kernel)", "w7a8", "static"),
        ("edgequant weight-only int4 per-channel (RTN)", "w4-weight-only", "weight_only"),
    ]
    paths = {}
    for name, preset, method in runs:
        start = time.perf_counter()
        qmodel = eq.quantize(model, preset, calib, method=method)
        wall = time.perf_counter() - start
        path = work / f"{preset}.onnx"
        info = eq.export_onnx(qmodel, path, x932[:8], verify_data=list(x932.split(256)))
        sim = C.accuracy(qmodel, x932, y932)
        evaluate(
            name,
            path,
            {
                "wall_s": wall,
                "export_s": info.wall_s,
                "sim_acc_test_932": sim,
                "top1_agreement_test_932": info.verification.top1_agreement,
                "sqnr_db": info.verification.sqnr_db,
            },
        )
        paths[preset] = path

    # The same model in the format before 2026-12-04 (int8 weights): what saturation costs here.
    int8_path = work / "w8a8_int8_weights.onnx"
    rewritten = as_int8_weights(paths["w8a8"], int8_path)
    sim_logits = C.ort_predict_fn(paths["w8a8"])(x932.numpy())
    old_logits = C.ort_predict_fn(int8_path)(x932.numpy())
    evaluate(
        "edgequant static w8a8, int8 weights (export format before 2026-12-04)",
        int8_path,
        {
            "weights_rewritten": rewritten,
            "top1_agreement_with_uint8_test_932": float(
                (np.asarray(sim_logits).argmax(1) == np.asarray(old_logits).argmax(1)).mean()
            ),
            "sqnr_db_vs_uint8_test_932": sqnr_db(
                torch.as_tensor(np.asarray(sim_logits)), torch.as_tensor(np.asarray(old_logits))
            ),
        },
    )

    fp32_size = results["fp32"]["size_bytes"]
    for row in results.values():
        row["size_ratio_vs_fp32"] = row["size_bytes"] / fp32_size

    n = 10 if args.quick else args.runs
    lat = bench.compare_latency(ort_path, paths["w8a8"], batch_sizes=(1, 64), runs=n, threads=2)
    lat_fp32 = bench.compare_latency(fp32, paths["w8a8"], batch_sizes=(1, 64), runs=n, threads=2)
    lat_fmt = bench.compare_latency(
        int8_path, paths["w8a8"], batch_sizes=(1, 64), runs=n, threads=2
    )
    lat_w7 = bench.compare_latency(ort_path, paths["w7a8"], batch_sizes=(1, 64), runs=n, threads=2)
    latency = {
        "edgequant_w7a8_ms": lat_w7["b"],
        "speed_ratio_w7a8_vs_ort": {k: 1.0 / v for k, v in lat_w7["ratio"].items()},
        "edgequant_int8_weights_ms": lat_fmt["a"],
        # >= 1: the uint8-weight export is at least as fast as the int8-weight one on this CPU
        "speed_ratio_uint8_vs_int8_weights": {k: 1.0 / v for k, v in lat_fmt["ratio"].items()},
        "ort_static_ms": lat["a"],
        "edgequant_static_ms": lat["b"],
        "fp32_ms": lat_fp32["a"],
        # speed ratio >= 1 means edgequant is at least as fast as ONNX Runtime's own model
        "speed_ratio_vs_ort": {k: 1.0 / v for k, v in lat["ratio"].items()},
        "speed_ratio_vs_fp32": {k: 1.0 / v for k, v in lat_fp32["ratio"].items()},
    }
    print("latency", json.dumps(latency), flush=True)
    import onnxruntime

    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, cpu flags: {cpu_flags()}",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "calibration": "512 images of train_4660 (calibration part)",
        "results": results,
        "latency": latency,
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
