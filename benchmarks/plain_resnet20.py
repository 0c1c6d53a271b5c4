"""The pretrained ResNet-20 through the plain calls the README shows, the library's defaults and
nothing else: what a user gets. Every accuracy is that of the exported ONNX model run in ONNX
Runtime, on test_932 (exact pixels) and on the 10,000 JPEG test images.

    python benchmarks/plain_resnet20.py [--runs qat-w4a4,ptq-w4a4,...] [--out FILE]

Runs (names): ptq-w8a8, ptq-w4a8, ptq-w4a4 (eq.quantize, static, 1,024 calibration images of
train_4660's calibration part), ptq-w4a4-512 (the same on 512: the start of qat-w4a4), and
qat-w4a4: eq.prepare_qat(model, "w4a4", calib_data=512 images) then eq.fit_qat(qmodel,
train_4660 as (images, labels) batches of 128, epochs=10, teacher=model), nothing else set;
mixed-2.5: plan = eq.mixed_precision(model, calib_data=1,024 images, budget=eq.Budget(size_ratio=
2.5 / 32)) then eq.quantize(model, plan, calib_data=the same images).

Each PTQ run's file is timed in ONNX Runtime (2 threads, batch 1 and 64, interleaved) against
the FP32 file and against ONNX Runtime's own quantize_static of it (MinMax, per-channel, QDQ, its
default INT8 weights, the 512 calibration images the presets read), whose accuracy is recorded
too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _resnet20 import ort_quantize_static  # benchmarks/_resnet20.py
from _results import cpu_description, write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant import bench
from edgequant.examples import cifar10 as C
from edgequant.examples.shared import shared_dir

LATENCY_RUNS = 40

RUNS = ("ptq-w8a8", "ptq-w4a8", "ptq-w4a4", "ptq-w4a4-512", "qat-w4a4", "mixed-2.5")
# Mixed precision's budget: 2.5 bits per weight on average, as a fraction of the FP32 weights.
MIXED_BITS = 2.5


def batches(x: torch.Tensor, size: int = 64) -> list[torch.Tensor]:
    return list(x.split(size))


def build(name: str, model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    preset = name.split("-")[1]
    if name.startswith("mixed"):
        calib = batches(C.calibration_split(1024)[0])
        budget = eq.Budget(size_ratio=MIXED_BITS / 32)
        plan = eq.mixed_precision(model, calib_data=calib, budget=budget)
        qmodel = eq.quantize(model, plan, calib_data=calib, progress=True)
        return qmodel, {"calib_images": 1024, "bits_per_weight_budget": MIXED_BITS}
    if name.startswith("ptq"):
        n = 512 if name.endswith("-512") else 1024
        calib = batches(C.calibration_split(n)[0])
        return eq.quantize(model, preset, calib_data=calib, progress=True), {"calib_images": n}
    calib = batches(C.calibration_split(512)[0])
    qmodel = eq.prepare_qat(model, preset, calib_data=calib, progress=True)
    x, y = C.load_split("train_4660")
    train = list(zip(x.split(128), y.split(128), strict=True))
    history = eq.fit_qat(qmodel, train, epochs=10, teacher=model)
    info = qmodel.quant_info
    return qmodel, {
        "calib_images": 512,
        "train_images": len(x),
        "history": history,
        "selection": {k: v for k, v in info["qat_selection"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--out", default="benchmarks/results/plain_resnet20.json")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    for n in names:
        if n not in RUNS:
            raise SystemExit(f"--runs: unknown {n!r}; known: {', '.join(RUNS)}")
    if shared_dir() is None:
        print("skipped: ../shared (CIFAR-10, ResNet-20) is absent", file=sys.stderr)
        return
    torch.manual_seed(0)
    model = C.load_resnet20().eval()
    test_x, test_y = C.load_split("test_932")
    jpeg_x, jpeg_y = C.load_jpeg_test()
    verify = batches(C.heldout_split()[0][:256])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        from edgequant.export.onnx import export_float_onnx

        export_float_onnx(model, fp32_path, test_x[:1])

        def file_row(name: str, path: Path) -> None:
            """An ONNX file's accuracy in ONNX Runtime on both test sets, and its size."""
            predict = C.ort_predict_fn(path)
            rows.append(
                {
                    "name": name,
                    "test_932": C.accuracy(predict, test_x, test_y),
                    "jpeg_10000": C.accuracy(predict, jpeg_x, jpeg_y),
                    "size_bytes": path.stat().st_size,
                }
            )
            print(rows[-1], flush=True)

        file_row("fp32", fp32_path)
        ort_path = Path(tmp) / "ort_static_w8a8.onnx"
        if any(not n.startswith("qat") for n in names):
            ort_quantize_static(fp32_path, ort_path, C.calibration_split(512)[0].numpy())
            file_row("onnxruntime quantize_static w8a8", ort_path)
        for name in names:
            started = time.perf_counter()
            qmodel, extra = build(name, model)
            wall_s = time.perf_counter() - started
            path = Path(tmp) / f"{name}.onnx"
            export = eq.export_onnx(qmodel, path, test_x[:8], verify_data=verify)
            predict = C.ort_predict_fn(path)
            deployed_top1 = predict(test_x.numpy()).argmax(1)
            with torch.inference_mode():
                simulated_logits = torch.cat([qmodel.eval()(b) for b in test_x.split(256)])
            differ = (simulated_logits.argmax(1).numpy() != deployed_top1).nonzero()[0]
            rows.append(
                {
                    "name": name,
                    "test_932": C.accuracy(predict, test_x, test_y),
                    "jpeg_10000": C.accuracy(predict, jpeg_x, jpeg_y),
                    "simulated_test_932": C.accuracy(qmodel, test_x, test_y),
                    # Simulated vs deployed top-1 on test_932 (the images where they differ).
                    "sim_deployed_agreement_test_932": 1.0 - len(differ) / len(test_x),
                    "sim_deployed_differ_test_932": [int(i) for i in differ],
                    "size_bytes": path.stat().st_size,
                    "top1_agreement": export.verification.top1_agreement,
                    "pipeline": qmodel.quant_info.get("pipeline", {}).get("steps"),
                    "wall_s": wall_s,
                    **extra,
                }
            )
            if not name.startswith("qat"):
                rows[-1]["latency"] = latency(path, fp32_path, ort_path)
            shown = {k: v for k, v in rows[-1].items() if k not in ("history", "selection")}
            print(shown, flush=True)
            if "selection" in extra:
                print("  selection:", extra["selection"]["why"], flush=True)
            save(
                args.out, names, rows, parser.get_default("out")
            )  # after every run: a long run keeps what it measured


def latency(path: Path, fp32_path: Path, ort_path: Path) -> dict[str, Any]:
    """Batch-1 and batch-64 latency of `path` against the FP32 file and ONNX Runtime's
    quantize_static model, each pair interleaved; speed ratios above 1: ours is faster."""
    out: dict[str, Any] = {"runs": LATENCY_RUNS, "threads": 2}
    for label, other in (("fp32", fp32_path), ("ort", ort_path)):
        lat = bench.compare_latency(other, path, batch_sizes=(1, 64), runs=LATENCY_RUNS)
        out[f"{label}_ms"] = lat["a"]
        out["ms_vs_" + label] = lat["b"]
        out[f"speed_vs_{label}"] = {k: 1.0 / v for k, v in lat["ratio"].items()}
    print("  latency:", out, flush=True)
    return out


def save(out: str, names: list[str], rows: list[dict[str, Any]], default_out: str) -> None:
    command = "python benchmarks/plain_resnet20.py --runs " + ",".join(names)
    write_json(
        out,
        {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": cpu_description(torch.get_num_threads()),
            "torch": torch.__version__,
            "command": command + ("" if out == default_out else f" --out {out}"),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
