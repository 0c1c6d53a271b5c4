"""Mixed-precision weights on the demo task (MNIST-1D CNN, 10.7k weights), against uniform 2/3/4/8-bit
weights, activations 8-bit, the library's default PTQ pipeline (GPTQ + bias correction at <= 4
bits). 512 calibration signals of the training split; choices (the accuracy-target search) on the
500 validation signals; accuracy of the exported ONNX model in ONNX Runtime on the 1,000 test
signals. About a minute on one core.

    python benchmarks/mixed_mnist1d.py [--out benchmarks/results/mixed_mnist1d.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import mnist1d
from edgequant.mixed import Budget, plan
from edgequant.mixed.allocate import packed_bytes
from edgequant.mixed.sensitivity import uniform_recipe
from edgequant.modules import QuantMixin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/mixed_mnist1d.json")
    parser.add_argument("--max-drop", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = mnist1d.trained_cnn()
    calib = mnist1d.calib_batches(512)
    data = mnist1d.load_mnist1d()
    x_val, y_val = data["x_val"], data["y_val"]
    x_test, y_test = data["x_test"].numpy(), data["y_test"].numpy()
    work = Path(tempfile.mkdtemp(prefix="eq-mixed-mnist1d-"))
    base = eq.Recipe.preset("w8a8")

    def val_acc(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float((m(x_val).argmax(1) == y_val).float().mean())

    with torch.no_grad():
        fp32_test = float((model(data["x_test"]).argmax(1) == data["y_test"]).float().mean())
    results: dict[str, dict[str, Any]] = {
        "fp32": {"sim_acc_val": val_acc(model), "acc_test_torch": fp32_test}
    }

    def deploy(name: str, qmodel: torch.nn.Module, extra: dict[str, Any]) -> None:
        import onnxruntime as ort

        path = work / f"{name}.onnx"
        info = eq.export_onnx(qmodel, path, calib[0][:8], verify_data=calib[:2])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        logits = session.run(None, {feed: x_test.astype(np.float32)})[0]
        bits = {
            n: m.weight_quantizer.spec.bits
            for n, m in qmodel.named_modules()
            if isinstance(m, QuantMixin) and m.weight_quantizer is not None
        }
        params = {n: qmodel.get_submodule(n).weight.numel() for n in bits}
        row = {
            "acc_test_ort": float((logits.argmax(1) == y_test).mean()),
            "sim_acc_val": val_acc(qmodel),
            "packed_bytes": packed_bytes(params, bits),
            "average_bits": 8 * packed_bytes(params, bits) / sum(params.values()),
            "onnx_bytes": info.size_bytes,
            "bits": bits,
            **extra,
        }
        results[name] = row
        print(name, json.dumps(row), flush=True)

    for b in (2, 3, 4, 8):
        deploy(f"uniform-w{b}a8", eq.quantize(model, uniform_recipe(base, b), calib), {})
    start = time.perf_counter()
    first = plan(model, calib, budget=Budget.average_bits(2.5), recipe=base, compare=True)
    analysis = {
        "plan_wall_s": time.perf_counter() - start,
        "ptq_s": first.ptq_s,
        "perturbation_s": first.sensitivity.wall_s,
        "hessian_s": first.other.wall_s if first.other else None,
        "milp_s": first.solver_s,
        "spearman": {str(b): r for b, r in first.spearman.items()},
    }
    print(first.table(), flush=True)
    for avg in (2.5, 3.0):
        p = plan(
            model, calib, budget=Budget.average_bits(avg), recipe=base,
            sensitivities=first.sensitivity,
        )  # fmt: skip
        deploy(f"mixed-{avg:g}bit", eq.quantize(model, p.recipe, calib), {"solver_s": p.solver_s})
    start = time.perf_counter()
    target = plan(
        model, calib, eval_fn=val_acc, max_drop=args.max_drop, recipe=base,
        sensitivities=first.sensitivity,
    )  # fmt: skip
    deploy(
        f"mixed-target-drop{args.max_drop:g}",
        eq.quantize(model, target.recipe, calib),
        {"search_s": time.perf_counter() - start, "val_drop": target.drop,
         "trials": len(target.trials)},
    )  # fmt: skip
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "threads": 1,
        "analysis": analysis,
        "results": results,
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
