"""Held-out selection for SmolLM2-135M's weight-only pipeline: calibrate on the first --calib
windows of 512 tokens of data/text/wikitext2_valid_tokenized.txt, score the *simulated* model
(PyTorch, no export) by perplexity on the last --heldout windows of the same file, which
calibration never reads. The test text is never opened: settings are chosen here, then measured
once on the test text by benchmarks/smollm2_lm.py.

    PYTHONPATH=$PWD flock /tmp/edgequant-bench.lock python benchmarks/smollm2_heldout.py \
        --grid g64 --calib 16 --trial default [--set decoder.GPTQ_DAMP=0.1] [--recipe awq=false]

--set patches a module constant of edgequant.ptq for this one trial (the knobs a trial varies);
--recipe sets a Recipe field. Each trial is appended to --out (one JSON file of trials), with
the FP32 model's held-out perplexity computed once and kept there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402
from _smollm2 import load_or_skip  # noqa: E402

import edgequant as eq  # noqa: E402
from edgequant.spec import weight_spec  # noqa: E402

GRIDS = {"g64": (4, 64), "pc": (4, None), "int3g64": (3, 64)}


def simulated_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    from edgequant.metrics import next_token_nll

    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows.split(2):
            logits = model(input_ids=row).logits
            nll, n = next_token_nll(logits, row)
            total, count = total + nll, count + n
    return math.exp(total / count)


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", choices=sorted(GRIDS), default="g64")
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--trial", required=True)
    parser.add_argument("--set", action="append", default=[], help="module.CONSTANT=value")
    parser.add_argument("--recipe", action="append", default=[], help="field=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/smollm2_heldout.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    from edgequant.examples.smollm2 import (
        VALID_TEXT,
        calibration_batches,
        text_windows,
    )

    loaded = load_or_skip()
    if loaded is None:
        return
    model, tok = loaded
    every = text_windows(tok, VALID_TEXT, 512)
    if every.shape[0] < args.calib + args.heldout:
        raise SystemExit(f"the validation text holds {every.shape[0]} windows only")
    heldout = every[-args.heldout :]
    path = Path(args.out)
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    key = f"last {args.heldout} x 512 tokens of wikitext2_valid_tokenized.txt"
    if results.get("heldout") != key:
        results = {
            "heldout": key,
            "calibration": "first N x 512 tokens of the same file (N per trial)",
            "metric": "perplexity of the simulated (fake-quantized PyTorch) model",
            "trials": [],
        }
    if "fp32_perplexity" not in results:
        results["fp32_perplexity"] = simulated_perplexity(model, heldout)
        write_json(path, results)
    fp32 = results["fp32_perplexity"]

    patches = []
    for item in args.set:
        name, value = item.split("=", 1)
        module_name, attr = name.rsplit(".", 1)
        module = importlib.import_module(f"edgequant.ptq.{module_name}")
        if not hasattr(module, attr):
            raise SystemExit(f"edgequant.ptq.{module_name} has no {attr}")
        patches.append((module, attr, getattr(module, attr)))
        setattr(module, attr, parse_value(value))
    fields = {k: parse_value(v) for k, v in (r.split("=", 1) for r in args.recipe)}

    bits, group = GRIDS[args.grid]
    recipe = eq.Recipe(
        name=args.grid, weight=weight_spec(bits, group), activation=None, first_last_bits=8
    ).replace(**fields)
    calib = calibration_batches(tok, 512, args.calib, 4)
    start = time.perf_counter()
    q = eq.quantize(model, recipe, calib_data=calib, method="weight_only", progress=True)
    wall = time.perf_counter() - start
    ppl = simulated_perplexity(q, heldout)
    for module, attr, old in patches:
        setattr(module, attr, old)
    pipeline = q.quant_info["pipeline"]
    trial = {
        "trial": args.trial,
        "grid": args.grid,
        "calib_windows": args.calib,
        "set": args.set,
        "recipe": args.recipe,
        "perplexity": ppl,
        "ratio_to_fp32": ppl / fp32,
        "calibration_wall_s": wall,
        "steps": pipeline["steps"],
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(trial), flush=True)
    results["trials"].append(trial)
    write_json(path, results)


if __name__ == "__main__":
    main()
