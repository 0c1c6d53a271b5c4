"""Issue 10's figures: 4-bit PTQ of the pretrained ResNet-20 without training or labels.

1,024 calibration images of train_4660 (calibration part); every accuracy is that of the exported
ONNX model run in ONNX Runtime, on test_932 (exact pixels) and on the 10,000 JPEG test images.
ONNX Runtime's quantize_static runs beside ours on the same images. The pipeline (GPTQ rounding,
bias correction, MSE ranges) was chosen on the held-out images of train_4660 (their last 660),
never on a test set: `python benchmarks/ptq4_resnet20.py --heldout` prints those figures.

    python benchmarks/ptq4_resnet20.py [--out benchmarks/results/ptq4_resnet20.json] [--quick]
        [--only "NAME,..."] [--ort]

Until 2026-12-03 the presets' calib_samples (512) capped the 1,024 images this script passes:
every figure recorded before then was calibrated on the first 512 of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _resnet20 import evaluate_onnx, ort_quantize_static  # benchmarks/_resnet20.py
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.export.onnx import export_float_onnx

CALIB = 1024


def heldout_scores(model: torch.nn.Module, qmodel: torch.nn.Module) -> dict[str, float]:
    """Agreement with the float model and KL to it, on the held-out images (simulated)."""
    x, y = C.heldout_split()
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    kl = torch.nn.functional.kl_div(
        out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"
    )
    return {
        "heldout_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
        "heldout_kl": float(kl),
        "heldout_acc": float((out.argmax(1) == y).float().mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/ptq4_resnet20.json")
    parser.add_argument("--quick", action="store_true", help="test_932 only, fewer runs")
    parser.add_argument(
        "--heldout", action="store_true", help="only the held-out figures used to choose"
    )
    parser.add_argument("--only", default="", help="comma-separated run names to keep")
    parser.add_argument(
        "--ort", action="store_true", help="ONNX Runtime's quantize_static beside --only's runs"
    )
    args = parser.parse_args()
    if cifar_missing():
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = C.load_resnet20().eval()
    x_cal, _ = C.calibration_split(CALIB)
    calib = list(x_cal.split(128))
    x932, y932 = C.load_split("test_932")
    test_sets = {"test_932": (x932.numpy(), y932.numpy())}
    if not args.quick and not args.heldout:
        xj, yj = C.load_jpeg_test()
        test_sets["jpeg_10000"] = (xj.numpy(), yj.numpy())
    work = Path(tempfile.mkdtemp(prefix="eq-ptq4-"))
    results: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, path: Path, extra: dict[str, Any]) -> None:
        evaluate_onnx(results, name, path, test_sets, extra)

    fp32 = work / "fp32.onnx"
    export_float_onnx(model, fp32, x932[:1])
    if not args.heldout:
        evaluate("fp32", fp32, {})

    def recipe(preset: str, **changes: Any) -> eq.Recipe:
        # Every calibration image: a preset's calib_samples (512) would cap them.
        return eq.Recipe.preset(preset).replace(calib_samples=CALIB, **changes)

    runs: list[tuple[str, eq.Recipe, str]] = [
        ("edgequant static w4a8 (default pipeline)", recipe("w4a8"), "static"),
        ("edgequant static w4a4 (default pipeline)", recipe("w4a4"), "static"),
        (
            "edgequant weight-only int4 per-channel (default pipeline)",
            recipe("w4-weight-only"),
            "weight_only",
        ),
        (
            "ablation: w4a8 round-to-nearest, MSE ranges",
            recipe("w4a8", rounding="nearest", bias_correction=False),
            "static",
        ),
        (
            "ablation: w4a8 bias correction only",
            recipe("w4a8", rounding="nearest", bias_correction=True),
            "static",
        ),
        (
            "ablation: w4a4 round-to-nearest, MSE ranges",
            recipe("w4a4", rounding="nearest", bias_correction=False),
            "static",
        ),
        (
            "ablation: w4a8 adaround + bias correction",
            recipe("w4a8", rounding="adaround"),
            "static",
        ),
        (
            "ablation: w4a4 layer-wise adaround + bias correction",
            recipe("w4a4", rounding="adaround"),
            "static",
        ),
    ]
    keep = {s.strip() for s in args.only.split(",") if s.strip()}
    for name, rec, method in runs:
        if keep and not any(k in name for k in keep):
            continue
        start = time.perf_counter()
        qmodel = eq.quantize(model, rec, calib, method=method, progress=False)
        wall = time.perf_counter() - start
        extra: dict[str, Any] = {
            "calib_wall_s": round(wall, 1),
            "pipeline": qmodel.quant_info.get("pipeline"),
        }
        extra.update(heldout_scores(model, qmodel))
        if args.heldout:
            results[name] = extra
            print(name, json.dumps(extra), flush=True)
            continue
        path = work / (name.split(" (")[0].replace(" ", "_").replace(":", "") + ".onnx")
        info = eq.export_onnx(qmodel, path, x932[:8], verify_data=list(x932.split(256)))
        extra.update(
            sim_acc_test_932=C.accuracy(qmodel, x932, y932),
            top1_agreement_test_932=info.verification.top1_agreement,
            sqnr_db=info.verification.sqnr_db,
        )
        evaluate(name, path, extra)

    if not args.heldout and (not keep or args.ort):
        for label, w4, a4 in (("w4a8", True, False), ("w4a4", True, True)):
            path = work / f"ort_{label}.onnx"
            name = f"onnxruntime quantize_static {label} (MinMax, per-channel, QDQ)"
            try:
                wall = ort_quantize_static(
                    fp32,
                    path,
                    x_cal.numpy(),
                    weight_type="int4" if w4 else "int8",
                    activation_type="uint4" if a4 else "uint8",
                )
                evaluate(name, path, {"calib_wall_s": round(wall, 1)})
            except Exception as err:  # a peer's failure is a result, reported as such
                results[name] = {"failed": f"{type(err).__name__}: {err}"[:300]}
                print(name, "failed:", results[name]["failed"], flush=True)

    fp32_size = fp32.stat().st_size
    for row in results.values():
        if "size_bytes" in row:
            row["size_ratio_vs_fp32"] = row["size_bytes"] / fp32_size
    import onnxruntime

    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "calibration": f"{CALIB} images of train_4660 (calibration part), no labels",
        "results": results,
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
