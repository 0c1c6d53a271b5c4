"""Issue 10, all-MiniLM-L6-v2 static W8A8 with every Linear input per-tensor 8-bit: what the
PTQ refinements add on top of SmoothQuant (alpha 0.8, the choice of static_minilm.py).

Candidates (SmoothQuant alpha, empirical bias correction, GPTQ rounding of the 8-bit weights,
calibration batches of 1 sentence so no padded token enters the ranges, the FFN-output inputs'
range observer, outlier channel splitting before smoothing) are scored on held-out calibration sentences in two folds (quantize on sentences 0-63,
score on 64-127, and the reverse; 128 scored sentences), ranked by mean cosine (within 1e-4: a
tie), then worst, then nearest-neighbour agreement. Rows measured in an earlier locked run of the same protocol are
passed in with --measured (a JSON file, recorded as such). The chosen candidate then calibrates
on all 128 sentences and is measured on the 640 evaluation sentences, simulated and deployed in
ONNX Runtime.

    flock /tmp/edgequant-bench.lock python benchmarks/static_minilm_refine.py \\
        [--measured /path/heldout.json] [--out benchmarks/results/static_minilm_refine.json]
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
from _minilm import load_or_skip  # benchmarks/_minilm.py
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)
from static_minilm import FFN_OUTPUT  # benchmarks/static_minilm.py

import edgequant as eq
from edgequant.examples import minilm as M
from edgequant.spec import LayerOverride, activation_spec

TARGETS = {"mean_cosine": 0.998, "min_cosine": 0.98, "nn_agreement": 0.95}
# name -> (alpha, bias correction, rounding, calibration batch size, range observer of the six
# FFN-output inputs (None: minmax, as every other input)[, outlier splitting quantile (None:
# off)]). "gptq" rounds to reconstruct the layer's float weight on its own quantized inputs (the
# rounding target "quantized"; the W8A8 default of resolve_pipeline).
Candidate = tuple[Any, ...]
CANDIDATES: dict[str, Candidate] = {
    "alpha 0.8": (0.8, False, "nearest", 16, None),
    "alpha 0.8, unpadded calibration": (0.8, False, "nearest", 1, None),
    "alpha 0.8, GPTQ (float target)": (0.8, False, "gptq", 16, None),
    "alpha 0.8, bias correction": (0.8, True, "nearest", 16, None),
    "alpha 0.9, bias correction": (0.9, True, "nearest", 16, None),
    "alpha 0.8, bias correction, unpadded calibration": (0.8, True, "nearest", 1, None),
    # Since bias correction leaves padded tokens out of its means (attention mask):
    "alpha 0.8, bias correction over real tokens only": (0.8, True, "nearest", 16, None),
    # The FFN-output inputs (GELU outputs) carry most of the error: at 16 bits all three bars are
    # met (static_minilm.py). Their 8-bit range from another observer:
    "alpha 0.8, bias correction, FFN-output ranges by MSE": (0.8, True, "nearest", 16, "mse"),
    "alpha 0.8, bias correction, FFN-output ranges by percentile": (
        0.8,
        True,
        "nearest",
        16,
        "percentile",
    ),
    "alpha 0.8, bias correction, FFN-output ranges by the auto calibrator": (
        0.8,
        True,
        "nearest",
        16,
        "auto",
    ),
    # 2026-12-03. The auto calibrator scored smoothed layers with their smoothing applied twice
    # (fixed), so the row above is measured again. The FFN-output error is half weights: alpha
    # 0.8 grows the weight columns of the outlier channels and coarsens every row's grid. Outlier
    # channel splitting (Recipe.split_outliers) shrinks the input range without growing weights;
    # GPTQ (own target) rounds the per-channel INT8 weights against the layer's output.
    "alpha 0.8, bias correction, FFN-output auto (re-measured)": (0.8, True, "nearest", 16, "auto"),
    "alpha 0.8, bias correction, FFN-output auto, GPTQ": (0.8, True, "gptq", 16, "auto"),
    # Measured first with the split after smoothing (rows "... (split after smoothing: first
    # implementation)"): the smoothing factors then grow the outlier columns as before. Now the
    # split comes first and the smoothing sees the split ranges.
    "alpha 0.8, bias correction, FFN-output auto, split 0.99": (
        0.8,
        True,
        "nearest",
        16,
        "auto",
        0.99,
    ),
    "alpha 0.8, bias correction, FFN-output auto, split 0.99, GPTQ": (
        0.8,
        True,
        "gptq",
        16,
        "auto",
        0.99,
    ),
}


def recipe_for(
    alpha: float | str,
    bc: bool,
    rounding: str,
    ffn_observer: str | None = None,
    split: float | None = None,
) -> eq.Recipe:
    overrides = (
        (LayerOverride(FFN_OUTPUT, activation=activation_spec(8, ffn_observer)),)
        if ffn_observer
        else ()
    )
    return eq.Recipe.preset("w8a8").replace(
        name=f"w8a8-smooth-{alpha}-bc{int(bc)}-{rounding}"
        + (f"-ffn-{ffn_observer}" * bool(ffn_observer))
        + (f"-split-{split}" if split is not None else ""),
        activation=activation_spec(8, "minmax"),
        smooth_alpha=alpha,
        bias_correction=bc,
        rounding=rounding,
        rounding_target="quantized",
        overrides=overrides,
        split_outliers=split,
    )


# Mean cosines closer than this are a tie (static_minilm.score's rounding to 4 decimals split
# 0.99853 from 0.99856); ties go to the worst sentence, then nearest-neighbour agreement.
MEAN_TIE = 1e-4


def choose(heldout: dict[str, dict[str, Any]]) -> str:
    best = max(row["mean_cosine"] for row in heldout.values())
    tied = [k for k, row in heldout.items() if row["mean_cosine"] >= best - MEAN_TIE]
    return max(tied, key=lambda k: (heldout[k]["min_cosine"], heldout[k]["nn_agreement"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/static_minilm_refine.json")
    parser.add_argument("--measured", default=None, help="held-out rows already measured")
    args = parser.parse_args()
    loaded = load_or_skip()
    if loaded is None:
        return 0
    model, tok = loaded
    import onnxruntime as ort

    cal = M.calibration_sentences(128)
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, 2 threads",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "targets": TARGETS,
        "float_ops": "attention matmuls (QK^T, attn x V), softmax, GELU, LayerNorm, residual adds",
        "heldout": {},
    }
    measured = json.loads(Path(args.measured).read_text()) if args.measured else {}

    def save() -> None:
        write_json(args.out, out)

    folds = [(cal[:64], cal[64:]), (cal[64:], cal[:64])]
    held = [M.tokenize_batches(tok, h, 16) for _, h in folds]
    held_refs = [M.embed(model, h) for h in held]
    for name, (alpha, bc, rounding, bs, ffn_obs, *split) in CANDIDATES.items():
        if name in measured:
            out["heldout"][name] = {**measured[name], "provenance": "earlier locked run"}
            continue
        start = time.perf_counter()
        rows = []
        for (fit_s, _), h, r in zip(folds, held, held_refs, strict=True):
            fit = M.tokenize_batches(tok, fit_s, bs)
            q = eq.quantize(
                model, recipe_for(alpha, bc, rounding, ffn_obs, *split), fit, method="static"
            )
            rows.append(M.cosine_report(r, M.embed(q, h)))
        row = {k: sum(x[k] for x in rows) / len(rows) for k in rows[0]}
        row["folds_nn_agreement"] = [x["nn_agreement"] for x in rows]
        row["wall_s"] = time.perf_counter() - start
        out["heldout"][name] = row
        print("held-out", name, json.dumps(row), flush=True)
        save()
    # Rows measured earlier with code since changed (kept for the record, not chosen from).
    out["heldout_superseded"] = {
        k: {**v, "provenance": "earlier locked run, code since changed"}
        for k, v in measured.items()
        if k not in CANDIDATES
    }
    choice = choose(out["heldout"])
    out["choice"] = choice
    print("choice", choice, flush=True)

    alpha, bc, rounding, bs, ffn_obs, *split = CANDIDATES[choice]
    calib = M.tokenize_batches(tok, cal, bs)
    evals = M.tokenize_batches(tok, M.eval_sentences(), batch_size=32)
    ref = M.embed(model, evals)
    start = time.perf_counter()
    qmodel = eq.quantize(
        model, recipe_for(alpha, bc, rounding, ffn_obs, *split), calib, method="static"
    )
    wall = time.perf_counter() - start
    path = Path(tempfile.mkdtemp(prefix="eq-minilm-refine-")) / "model.onnx"
    info = eq.export_onnx(qmodel, path, evals[0], verify_data=evals[:2])
    dep = M.cosine_report(ref, M.embed(M.ort_encoder_fn(path), evals))
    linear = [r for r in qmodel.quant_summary.quantized if r.type == "Linear"]
    row = {
        **dep,
        "sim": M.cosine_report(ref, M.embed(qmodel, evals)),
        **{f"meets_{k}": dep[k] >= v for k, v in TARGETS.items()},
        "eval_sentences": int(ref.shape[0]),
        "calibration_sentences": len(cal),
        "calibration_batch_size": bs,
        "calibration_wall_s": wall,
        "size_bytes": info.size_bytes,
        "verify_sqnr_db": info.verification.sqnr_db,
        "encoder_linear_uint8_per_tensor_input": sum(
            r.name.startswith("encoder.")
            and r.activation.startswith("uint8")
            and "per-tensor" in r.activation
            for r in linear
        ),
        "pipeline": qmodel.quant_info.get("pipeline", {}).get("steps"),
    }
    out["results"] = {f"edgequant static w8a8, {choice}": row}
    print(choice, json.dumps(row), flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
