"""Issue 6 (rest): the fully integer target on the pretrained ResNet-20, static W8A8.

mcu-int8: the export's fully integer property (fully_integer_violations, must be none),
deployed accuracy in ONNX Runtime on test_932 (bar >= 91.0 %) and on the 10,000 JPEG test
images, and eq.run_integer, the integer-only reference, against ONNX Runtime on test_932: top-1
agreement (bar >= 99.9 %), its own accuracy, the share of logits that differ and by how many
output steps, wall time; for both fixed-point roundings ("single", the default, and gemmlowp's
"double"). Integer sums with numpy int64 instead of float64 BLAS are timed on 64 images and
must give identical outputs.
dsp-pow2: count of QDQ scales that are not exact powers of two (must be 0), deployed accuracy
on test_932 (bar >= 91.0 %) and JPEG.
Calibration: 512 images of train_4660 (calibration part), as benchmarks/targets_resnet20.py.

    flock /tmp/edgequant-bench.lock python benchmarks/integer_resnet20.py \
        [--out benchmarks/results/integer_resnet20.json] [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _resnet20 import (  # benchmarks/_resnet20.py
    eval_sets,
    load_resnet20_cifar,
    resnet20_parser,
    results_head,
)
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.export.integer_graph import fully_integer_violations
from edgequant.recipe import Recipe

sys.path.insert(0, str(Path(__file__).parent))
from targets_resnet20 import count_not_pow2, qdq_scales  # noqa: E402


def output_step(path: Path) -> float:
    """The scale of the DequantizeLinear that writes the graph output (one output LSB)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    node = next(n for n in graph.node if n.output[0] == graph.output[0].name)
    if node.op_type != "DequantizeLinear":
        raise RuntimeError(f"the graph output comes from {node.op_type}, not DequantizeLinear")
    return float(consts[node.input[1]])


def main() -> int:
    args = resnet20_parser(__doc__, "benchmarks/results/integer_resnet20.json").parse_args()
    if cifar_missing():
        return 0
    data = load_resnet20_cifar()
    model, calib, x932, y932 = data.model, data.calib, data.x932, data.y932
    test_sets = eval_sets(data, args.quick)
    work = Path(tempfile.mkdtemp(prefix="eq-integer-"))
    results: dict[str, dict] = {}
    bars: dict[str, bool] = {}

    for target in ("mcu-int8", "dsp-pow2"):
        recipe = Recipe.preset("w8a8").for_target(target)
        qmodel = eq.quantize(model, recipe, calib, method="static")
        path = work / f"{target}.onnx"
        info = eq.export_onnx(qmodel, path, x932[:8], verify_data=list(x932.split(256)))
        fn = C.ort_predict_fn(path)
        row: dict = {
            "weights": recipe.weight.short(),
            "activations": recipe.activation.short(),
            "sim_acc_test_932": C.accuracy(qmodel, x932, y932),
            "top1_agreement_sim_vs_ort_test_932": info.verification.top1_agreement,
            "size_bytes": path.stat().st_size,
        }
        row.update({f"acc_{k}": C.accuracy(fn, x, y) for k, (x, y) in test_sets.items()})
        bars[f"{target} deployed test_932 >= 91.0 %"] = row["acc_test_932"] >= 0.910
        if target == "dsp-pow2":
            scales = qdq_scales(path)
            row.update(
                scales=sum(int(s.size) for s in scales), scales_not_pow2=count_not_pow2(scales)
            )
            bars["dsp-pow2 every scale a power of two"] = row["scales_not_pow2"] == 0
        else:
            violations = fully_integer_violations(path)
            row.update(
                export_fully_integer=info.fully_integer,
                fully_integer_violations=violations,
            )
            bars["mcu-int8 export fully integer"] = not violations
            ort_logits = fn(x932.numpy())
            step = output_step(path)
            y = y932.numpy()
            for rounding in ("single", "double"):
                start = time.perf_counter()
                logits = eq.run_integer(path, x932, rounding=rounding)
                wall = time.perf_counter() - start
                assert isinstance(logits, np.ndarray)
                agree = float((logits.argmax(1) == ort_logits.argmax(1)).mean())
                row[f"run_integer_{rounding}"] = {
                    "top1_agreement_vs_ort_test_932": agree,
                    "acc_test_932": float((logits.argmax(1) == y).mean()),
                    "logits_differing": float((logits != ort_logits).mean()),
                    "max_abs_diff_output_steps": float(np.abs(logits - ort_logits).max() / step),
                    "wall_s_test_932": wall,
                    "ms_per_image": 1000 * wall / len(y),
                }
                bars[f"run_integer ({rounding} rounding) agrees with ORT >= 99.9 %"] = (
                    agree >= 0.999
                )
            start = time.perf_counter()
            exact = eq.run_integer(path, x932[:64], matmul="int64")
            row["int64_sums_64_images"] = {
                "identical_to_float64": bool(
                    np.array_equal(exact, eq.run_integer(path, x932[:64]))
                ),
                "wall_s": time.perf_counter() - start,
            }
        results[target] = row
        print(target, json.dumps(row), flush=True)
    out = {
        **results_head(", torch threads 2, ORT threads 2"),
        "results": results,
        "bars": bars,
    }
    write_json(args.out, out)
    for name, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
