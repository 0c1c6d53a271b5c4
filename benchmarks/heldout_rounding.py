"""Held-out figures behind the learned-rounding defaults at 2-4 weight bits (issues 10 and 11).

Each variant is one `eq.quantize` of the pretrained ResNet-20 (--calib calibration images of
train_4660, 1,024 by default; before 2026-12-03 the presets' calib_samples capped them at 512), simulated, scored against FP32 on images never used to calibrate and never a test
image: "h", the 660 held-out images of train_4660, and "hj", the same images JPEG-compressed at
quality 75 as the JPEG test set is, and mirrored (1,320 inputs; cifar10.heldout_jpeg_split).

    python benchmarks/heldout_rounding.py [--variants NAME,...] [--out FILE]

A variant is a preset or the 2.5-bit mixed plan ("plan2.5", the perturbation plan of the
sensitivities in benchmarks/results/mixed_resnet20.json, or "hplan2.5" from the Hessian ones),
then optional recipe changes after a colon as JSON, e.g. 'w2a8:{"rounding_target": "quantized"}'.
'"minmax": true' puts every sub-8-bit weight on min/max grids (the plans' old behaviour);
'"clip_search": false' turns off GPTQ's output-error clipping search at <= 3 bits
(ptq.gptq.search_clipping_), '"clip_search": 4' extends it to 4 bits; '"target_damp": 0.1' sets
the input-error target's damping (ptq.gptq.TARGET_DAMP; GPTQ's own is Recipe.gptq_damp).
--calib-seed picks another draw of the calibration images (calibration_split's seed), to see
how much a figure moves with the draw alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, cast

import torch
from _qat import heldout_scores  # benchmarks/ (sys.path[0] here)
from _results import write_json
from mixed_resnet20 import restore

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.examples.shared import shared_dir
from edgequant.mixed import Budget, plan
from edgequant.ptq import gptq as R

DEFAULT = [
    'w2a8:{"rounding_target": "quantized", "clip_search": false}',
    'w2a8:{"clip_search": false}',
    "w2a8",
    'w3a8:{"rounding_target": "quantized", "clip_search": false}',
    'w3a8:{"clip_search": false}',
    "w3a8",
    "w4a8",
    'w4a8:{"clip_search": 4}',
    'w4a4:{"rounding_target": "quantized"}',
    'w4a4:{"rounding": "gptq"}',
    "w4a4",
    'plan2.5:{"minmax": true, "rounding_target": "quantized", "clip_search": false}',
    'plan2.5:{"minmax": true, "clip_search": false}',
    'plan2.5:{"clip_search": false}',
    "plan2.5",
    'plan2.5:{"rounding": "adaround"}',
    "hplan2.5",
]


def scores(qmodel: torch.nn.Module, sets: dict[str, Any]) -> dict[str, float]:
    """KL to FP32 and top-1 on each set: sets[tag] = (images, labels, FP32 log-probabilities)."""
    row = {}
    for tag, (x, y, teacher_logp) in sets.items():
        measured = heldout_scores(qmodel, (x, y), teacher_logp)
        row[f"{tag}_kl"] = round(measured["heldout_kl"], 5)
        row[f"{tag}_top1"] = round(measured["heldout_acc"], 4)
    return row


def minmax_grids(recipe: eq.Recipe) -> eq.Recipe:
    def mm(spec: eq.QuantSpec | None) -> eq.QuantSpec | None:
        return spec.replace(observer="minmax") if spec is not None and spec.bits < 8 else spec

    overrides = tuple(dataclasses.replace(o, weight=mm(o.weight)) for o in recipe.overrides)
    return recipe.replace(weight=mm(recipe.weight), overrides=overrides)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=";".join(DEFAULT), help="';'-separated variants")
    parser.add_argument("--calib", type=int, default=1024, help="calibration images")
    parser.add_argument("--calib-seed", type=int, default=0, help="calibration_split's seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="benchmarks/results/heldout_rounding.json")
    args = parser.parse_args()
    if shared_dir() is None:
        print("skipped: ../shared (CIFAR-10, ResNet-20) is absent; set EDGEQUANT_SHARED")
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = C.load_resnet20().eval()
    x_cal, _ = C.calibration_split(args.calib, seed=args.calib_seed)
    calib = list(x_cal.split(64))
    sets = {}
    for tag, (x, y) in (("h", C.heldout_split()), ("hj", C.heldout_jpeg_split())):
        with torch.no_grad():  # FP32 once, not once per variant
            sets[tag] = (x, y, torch.log_softmax(model(x), -1))
    results: dict[str, Any] = {"fp32": scores(model, sets)}
    print("fp32", results["fp32"], flush=True)
    analysis = None
    for variant in args.variants.split(";"):
        name, _, changes_text = variant.partition(":")
        changes = json.loads(changes_text) if changes_text else {}
        minmax = changes.pop("minmax", False)
        clip = changes.pop("clip_search", True)
        R.CLIP_SEARCH_MAX_BITS = 3 if clip is True else int(clip)
        R.TARGET_DAMP = float(changes.pop("target_damp", 0.01))
        if name.endswith("plan2.5"):
            if analysis is None:
                analysis = json.loads(Path("benchmarks/results/mixed_resnet20.json").read_text())[
                    "analysis"
                ]
            method = "hessian" if name.startswith("h") else "perturbation"
            sens = restore(analysis[f"scores_{method}"], method)
            base = eq.Recipe.preset("w8a8").replace(calib_samples=args.calib)
            recipe = plan(model, calib, budget=Budget.average_bits(2.5), recipe=base,
                          sensitivities=sens).recipe  # fmt: skip
        else:
            # Every calibration image: a preset's calib_samples (512) would cap them.
            recipe = eq.Recipe.preset(name).replace(calib_samples=args.calib)
        recipe = recipe.replace(**changes)
        if minmax:
            recipe = minmax_grids(recipe)
        start = time.perf_counter()
        qmodel = eq.quantize(model, recipe, calib)
        pipeline = cast("dict[str, Any]", qmodel.quant_info)["pipeline"]
        row = {
            "quantize_s": round(time.perf_counter() - start, 1),
            "rounding": pipeline["rounding"],
            "rounding_target": pipeline["rounding_target"],
            "clip_search_max_bits": R.CLIP_SEARCH_MAX_BITS,
            "gptq_damp": pipeline.get("gptq_damp"),
            "target_damp": R.TARGET_DAMP,
            "calib_seed": args.calib_seed,
            **scores(qmodel, sets),
        }
        results[variant] = row
        print(variant, json.dumps(row), flush=True)
    write_json(args.out, {"date": time.strftime("%Y-%m-%d %H:%M"), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
