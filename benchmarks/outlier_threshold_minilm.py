"""Issue 27: the threshold of the outlier rule (ptq.outliers.OUTLIER_RATIO), chosen on held-out
calibration sentences of all-MiniLM-L6-v2, never on the evaluation sentences.

Every Linear input's max/median of per-channel ranges is recorded (calibration sentences 0-63)
beside those of ResNet-20's Linear head (256 CIFAR-10 training images) and of the tiny random
BERT of tests/ptq; then the default pipeline (eq.quantize(model, "w8a8", data, method=...), no
other argument) is run with each candidate threshold patched in, calibrating on sentences 0-63
and scoring on 64-127 (mean cosine first, then worst, then nearest-neighbour agreement).

    flock /tmp/edgequant-bench.lock python benchmarks/outlier_threshold_minilm.py \\
        [--out benchmarks/results/outlier_threshold_minilm.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from _minilm import fit_and_heldout, load_or_skip  # benchmarks/_minilm.py
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import minilm as M
from edgequant.ptq import outliers, smoothquant
from edgequant.ptq.static import build_static

CANDIDATES = (3.0, 6.0, 12.0)


def ratios(model: Any, batches: list[Any]) -> dict[str, float]:
    """Every Linear input's max/median per-channel range on `batches` (float model)."""
    qmodel, _, _ = build_static(model, eq.Recipe.preset("w8a8"), batches[0])
    stats = smoothquant.input_stats(qmodel, batches, 10**9)
    return {n: round(outliers.outlier_ratio(s.absmax), 2) for n, s in stats.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/outlier_threshold_minilm.json")
    parser.add_argument("--methods", default="dynamic,static")
    args = parser.parse_args()
    loaded = load_or_skip()
    if loaded is None:
        return 0
    model, tok = loaded
    fit, held, held_ref = fit_and_heldout(model, tok, M.calibration_sentences(128))
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "protocol": "calibrate on calibration sentences 0-63, score on 64-127",
        "ratios": {"all-MiniLM-L6-v2 (calibration sentences 0-63)": ratios(model, fit)},
        "heldout": {},
    }
    try:
        from edgequant.examples import cifar10

        x, _ = cifar10.load_split("train_4660")
        resnet = cifar10.load_resnet20().eval()
        out["ratios"]["ResNet-20 (256 CIFAR-10 training images)"] = ratios(
            resnet, list(x[:256].split(64))
        )
    except (FileNotFoundError, ImportError) as err:
        out["ratios"]["ResNet-20"] = f"skipped: {err}"
    for method in args.methods.split(","):
        for threshold in CANDIDATES:
            outliers.OUTLIER_RATIO = threshold
            start = time.perf_counter()
            q = eq.quantize(model, "w8a8", fit, method=method)
            row: dict[str, Any] = M.cosine_report(held_ref, M.embed(q, held))
            row["wall_s"] = time.perf_counter() - start
            row["flagged"] = len(q.quant_info["pipeline"].get("outlier_inputs", {}))
            row["steps"] = q.quant_info["pipeline"]["steps"]
            out["heldout"][f"{method}/{threshold}"] = row
            print(method, threshold, json.dumps(row), flush=True)
            write_json(args.out, out)
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
