"""The demo's settings, chosen on MNIST-1D's validation split: CNN width x bit width, PTQ
against QAT from the PTQ start, QAT by the plain calls the demo makes.

For each width: the FP32 CNN (examples.mnist1d.trained_cnn, cached, trained without QAT's
held-out batches unless --fp32-on-all); for each preset (with the
demo's GPTQ rounding below 8 bits) eq.quantize (static) and eq.prepare_qat + eq.fit_qat with
fit_qat's defaults save `--lrs` (default: fit_qat's own), on the training split less the
held-out every-7th batch that chooses the kept epoch, teacher the FP32 model, as compare() runs
it. Scored in PyTorch's simulation (the exported model agrees with it, checked by every export)
on the 500 validation signals, after every epoch too; the test split is never read here.

    flock /tmp/edgequant-bench.lock python benchmarks/demo_sweep.py --widths 16,32
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import mnist1d as M
from edgequant.report.demo import low_bit_rounding


def _val_acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())
    finally:
        for m, f in flags.items():
            m.training = f


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,32")
    parser.add_argument("--presets", default="w8a8,w4a4,w3a3,w2a2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fp32-epochs", type=int, default=M.EPOCHS)
    parser.add_argument("--lrs", default="default", help="'default' (fit_qat's) or numbers")
    parser.add_argument(
        "--range-lr-scales", default="default", help="'default' (fit_qat's) or numbers"
    )
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=M.BATCH_SIZE)
    parser.add_argument("--qat", default="below8", help="'below8', 'all' or 'none'")
    parser.add_argument(
        "--fp32-on-all",
        action="store_true",
        help="train FP32 on the whole training split, QAT's held-out batches included",
    )
    parser.add_argument("--out", default="benchmarks/results/demo_sweep.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the demo runs PTQ and QAT
    data = M.load_mnist1d()
    x_val, y_val = data["x_val"], data["y_val"]
    calib = M.calib_batches(args.calib)
    fit, held = M.qat_split(args.batch_size)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1",
        "load_average_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "args": vars(args),
        "scored_on": "validation split (500 signals), PyTorch simulation",
        "widths": {},
    }
    for width in [int(w) for w in args.widths.split(",")]:
        start = time.perf_counter()
        model = M.trained_cnn(
            epochs=args.fp32_epochs, channels=width, qat_holdout=not args.fp32_on_all
        )
        row: dict[str, Any] = {
            "fp32_val": _val_acc(model, x_val, y_val),
            "fp32_wall_s": time.perf_counter() - start,
            "params": sum(p.numel() for p in model.parameters()),
        }
        for preset in args.presets.split(","):
            recipe = low_bit_rounding(eq.Recipe.preset(preset))
            start = time.perf_counter()
            ptq = eq.quantize(model, recipe, calib, method="static")
            cell: dict[str, Any] = {
                "ptq_val": _val_acc(ptq, x_val, y_val),
                "ptq_wall_s": time.perf_counter() - start,
            }
            below8 = recipe.weight is not None and recipe.weight.bits < 8
            if args.qat == "all" or (args.qat == "below8" and below8):
                for lr, scale in [
                    (lr, scale)
                    for lr in args.lrs.split(",")
                    for scale in args.range_lr_scales.split(",")
                ]:
                    settings: dict[str, float] = {} if lr == "default" else {"lr": float(lr)}
                    if scale != "default":
                        settings["range_lr_scale"] = float(scale)
                    start = time.perf_counter()
                    qmodel = eq.prepare_qat(model, recipe, calib_data=calib)
                    per_epoch: list[float] = []
                    eq.fit_qat(
                        qmodel,
                        fit,
                        epochs=args.epochs,
                        teacher=model,
                        progress=False,
                        val_data=held,
                        on_epoch_end=lambda epoch, record, q=qmodel, p=per_epoch: p.append(
                            _val_acc(q, x_val, y_val)
                        ),
                        **settings,
                    )
                    chosen = qmodel.quant_info["qat_selection"]
                    key = f"qat_lr_{lr}" + ("" if scale == "default" else f"_range_{scale}")
                    cell[key] = {
                        "kept_epoch": chosen["kept_epoch"],
                        "kept_val": _val_acc(qmodel, x_val, y_val),
                        "val_by_epoch": per_epoch,
                        "heldout_hits_by_epoch": chosen["heldout_top1"],
                        "why": chosen["why"],
                        "wall_s": time.perf_counter() - start,
                    }
            row[preset] = cell
            print(width, preset, cell, flush=True)
        out["widths"][str(width)] = row
        write_json(args.out, out)
    write_json(args.out, out)
    print(f"wrote {Path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
