"""Issue 6 (part): the pretrained ResNet-20, static W8A8 under each hardware target of
targets.TARGETS, exported and run in ONNX Runtime.

Per target: accuracy on test_932 (exact pixels) and on the 10,000 JPEG test images, ONNX file
size, and the count of QDQ scales (weights, activations, INT32 biases) that are not exact powers
of two (np.frexp mantissa != 0.5); dsp-pow2 must have none. Calibration: the same 512 images of
train_4660 for every target.

    python benchmarks/targets_resnet20.py [--out benchmarks/results/targets_resnet20.json] [--quick]
"""

from __future__ import annotations

import json
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
from edgequant.recipe import Recipe
from edgequant.targets import TARGETS


def qdq_scales(path: Path) -> list[np.ndarray]:
    """Every scale read by a QuantizeLinear or DequantizeLinear of the graph."""
    import onnx

    from edgequant.export.integer_graph import constant_arrays

    graph = onnx.load(str(path)).graph
    values = constant_arrays(graph)
    return [
        values[node.input[1]]
        for node in graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
    ]


def count_not_pow2(scales: list[np.ndarray]) -> int:
    return sum(int((np.frexp(s.astype(np.float64))[0] != 0.5).sum()) for s in scales)


def main() -> int:
    args = resnet20_parser(__doc__, "benchmarks/results/targets_resnet20.json").parse_args()
    if cifar_missing():
        return 0
    data = load_resnet20_cifar(threads=None)
    model, calib, x932, y932 = data.model, data.calib, data.x932, data.y932
    test_sets = eval_sets(data, args.quick)
    work = Path(tempfile.mkdtemp(prefix="eq-targets-"))
    results: dict[str, dict] = {}
    for target in TARGETS:
        recipe = Recipe.preset("w8a8").for_target(target)
        start = time.perf_counter()
        qmodel = eq.quantize(model, recipe, calib)
        wall = time.perf_counter() - start
        row: dict = {
            "weights": recipe.weight.short(),
            "activations": recipe.activation.short(),
            "sim_acc_test_932": C.accuracy(qmodel, x932, y932),
            "quantize_s": wall,
        }
        path = work / f"{target}.onnx"
        info = eq.export_onnx(qmodel, path, x932[:8], verify_data=list(x932.split(256)))
        fn = C.ort_predict_fn(path)
        row.update({f"acc_{k}": C.accuracy(fn, x, y) for k, (x, y) in test_sets.items()})
        scales = qdq_scales(path)
        row.update(
            top1_agreement_test_932=info.verification.top1_agreement,
            size_bytes=path.stat().st_size,
            scales=sum(int(s.size) for s in scales),
            scales_not_pow2=count_not_pow2(scales),
        )
        results[target] = row
        print(target, json.dumps(row), flush=True)
    out = {
        **results_head(),
        "results": results,
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
