"""Issue 9 on the demo task: QAT vs PTQ at 8, 4 and 2 bits on MNIST-1D (the examples' CNN).

PTQ: eq.quantize (static, the package's default pipeline for the bits). QAT: eq.prepare_qat from
the same calibration (MSE activation ranges) and eq.fit_qat with LSQ and distillation from the
FP32 model, on the training split; the learning rate is chosen per bit width on the validation
split (the last 500 training signals, never trained on). Accuracy: the exported model in ONNX
Runtime on the 1000 test signals.

    flock /tmp/edgequant-bench.lock python benchmarks/qat_mnist1d.py [--epochs 8]
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
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import mnist1d as M
from edgequant.examples.cifar10 import ort_predict_fn
from edgequant.export.onnx import export_float_onnx


def recipe_for(preset: str) -> eq.Recipe:
    recipe = eq.Recipe.preset(preset)
    assert recipe.weight is not None and recipe.activation is not None
    weight = recipe.weight.replace(observer="mse") if recipe.weight.bits < 8 else recipe.weight
    return recipe.replace(weight=weight, activation=recipe.activation.replace(observer="mse"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="w8a8,w4a4,w2a2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lrs", default="0.003,0.01,0.03")
    parser.add_argument("--out", default="benchmarks/results/qat_mnist1d.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = M.trained_cnn()
    data = M.load_mnist1d()
    calib = M.calib_batches(512)
    val = (data["x_val"], data["y_val"])
    test = (data["x_test"], data["y_test"])
    train = M.train_batches(100, seed=0)
    work = Path(tempfile.mkdtemp(prefix="eq-qat-mnist1d-"))
    fp32_path = work / "fp32.onnx"
    export_float_onnx(model, fp32_path, test[0][:8])
    results: dict[str, Any] = {
        "fp32": {
            "acc_test": M.accuracy(ort_predict_fn(fp32_path), *test),
            "size_bytes": fp32_path.stat().st_size,
        }
    }
    print("fp32", results["fp32"], flush=True)

    def deployed(qmodel: torch.nn.Module, name: str) -> dict[str, Any]:
        path = work / f"{name}.onnx"
        info = eq.export_onnx(qmodel, path, test[0][:8], verify_data=list(test[0].split(250)))
        return {
            "acc_test": M.accuracy(ort_predict_fn(path), *test),
            "size_bytes": path.stat().st_size,
            "top1_agreement": info.verification.top1_agreement,
        }

    for preset in args.presets.split(","):
        recipe = recipe_for(preset)
        ptq = eq.quantize(model, recipe, calib)
        row_ptq: dict[str, Any] = {"acc_val": M.accuracy(ptq, *val)}
        try:  # an export failure is recorded; the QAT run still happens
            row_ptq.update(deployed(ptq, f"ptq_{preset}"))
        except Exception as err:
            row_ptq["export_failed"] = f"{type(err).__name__}: {str(err)[:300]}"
        best: tuple[float, float, torch.nn.Module, dict[str, Any]] | None = None
        selection = {}
        for lr in map(float, args.lrs.split(",")):
            start = time.perf_counter()
            qmodel = eq.prepare_qat(model, recipe, calib)
            history = eq.fit_qat(
                qmodel,
                train,
                epochs=args.epochs,
                lr=lr,
                lr_scaling="none",  # --lrs are absolute rates, as recorded
                teacher=model,
                kd_weight=0.5,
                temperature=2.0,
                progress=False,
                seed=0,
            )
            acc_val = M.accuracy(qmodel, *val)
            selection[lr] = acc_val
            record = {
                "lr": lr,
                "acc_val": acc_val,
                "train_wall_s": time.perf_counter() - start,
                "loss_by_epoch": [r["loss"] for r in history],
            }
            if best is None or acc_val > best[0]:
                best = (acc_val, lr, qmodel, record)
        assert best is not None
        row_qat = {**best[3], "val_by_lr": selection}
        try:
            row_qat.update(deployed(best[2], f"qat_{preset}"))
        except Exception as err:
            row_qat["export_failed"] = f"{type(err).__name__}: {str(err)[:300]}"
        results[preset] = {"ptq": row_ptq, "qat": row_qat}
        print(preset, json.dumps(results[preset]), flush=True)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "epochs": args.epochs,
        "setup": "MNIST-1D CNN (examples.mnist1d.trained_cnn); 512 calibration signals; QAT: LSQ, "
        "KD (T=2, 0.5 KL + 0.5 CE), SGD momentum 0.9, cosine; lr chosen on the 500 validation signals",
        "results": results,
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
