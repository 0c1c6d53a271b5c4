"""Where integer attention loses on all-MiniLM-L6-v2 (static W8A8, the library's defaults): the
plain call's model with one kind of attention-matmul operand put back to float at a time (Q and
Kᵀ of Q·Kᵀ, P or V of P·V), in simulation, on held-out sentences: the model calibrates on the
first 64 calibration sentences and is scored on the other 64 (never on the evaluation set).

    flock /tmp/edgequant-bench.lock python benchmarks/attention_minilm.py \\
        [--out benchmarks/results/attention_minilm.json]
"""

from __future__ import annotations

import argparse
import time

from _minilm import fit_and_heldout, load_or_skip, results_header  # benchmarks/_minilm.py
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import minilm as M
from edgequant.modules import QuantMatMul

# Which operand quantizers go back to float, by variant (per QuantMatMul: .0 is Q·Kᵀ, .1 P·V).
VARIANTS = {
    "all integer": (),
    "Q float": (("0", "input_quantizer"),),
    "K float": (("0", "other_quantizer"),),
    "P float": (("1", "input_quantizer"),),
    "V float": (("1", "other_quantizer"),),
    "attention float": (
        ("0", "input_quantizer"),
        ("0", "other_quantizer"),
        ("1", "input_quantizer"),
        ("1", "other_quantizer"),
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/attention_minilm.json")
    args = parser.parse_args()
    loaded = load_or_skip()
    if loaded is None:
        return 0
    model, tok = loaded
    sentences = M.calibration_sentences(128)
    fit, held, held_ref = fit_and_heldout(model, tok, sentences)
    out = results_header(held_ref, sentences[:64], call='eq.quantize(model, "w8a8", fit)')
    out["scored_on"] = "held-out calibration sentences 64-127 (simulation)"
    start = time.perf_counter()
    qmodel = eq.quantize(model, "w8a8", fit, method="static")
    out["quantize_wall_s"] = time.perf_counter() - start
    matmuls = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantMatMul)}
    out["grids"] = {
        f"{n}.{part}": {
            "scale": float(getattr(m, part).scale),
            "zero_point": int(getattr(m, part).zero_point),
        }
        for n, m in matmuls.items()
        for part in ("input_quantizer", "other_quantizer")
    }
    for label, parts in VARIANTS.items():
        off = [
            getattr(m, part)
            for n, m in matmuls.items()
            for index, part in parts
            if n.endswith(f".quant_matmuls.{index}")
        ]
        for q in off:
            q.set_mode("disabled")
        row = M.cosine_report(held_ref, M.embed(qmodel, held))
        for q in off:
            q.set_mode("quantize")
        out["results"][label] = row
        print(label, row, flush=True)
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
