"""`edgequant demo`: the main job on built-in data (MNIST-1D, generated locally, no download):
train a small FP32 CNN, run every method (PTQ, mixed precision, QAT), export each, measure it in
ONNX Runtime, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgequant.report.compare import Predict, Report, compare, stderr_progress


def _quick_runs() -> list[Any]:
    """--quick: static W8A8, W4A8 and W4A4 PTQ, QAT W4A4 for one epoch and the mixed plan; the
    W4A4 runs round with GPTQ (one pass) instead of block reconstruction, QAT's PTQ start included (so
    QAT and PTQ W4A4 start from the same model), and the mixed plan's sensitivity analysis
    rounds to nearest, to keep the whole run near a minute."""
    import dataclasses

    from edgequant.report.compare import default_runs

    keep = ("ptq-static-w8a8", "ptq-static-w4a8", "ptq-static-w4a4", "qat-w4a4")
    runs = []
    for run in default_runs(qat=True, qat_epochs=1):
        if run.name in ("ptq-static-w4a4", "qat-w4a4"):
            run = dataclasses.replace(run, recipe=run.recipe.replace(rounding="gptq"))
        if run.family == "mixed":
            run = dataclasses.replace(run, recipe=run.recipe.replace(rounding="nearest"))
            runs.append(run)
        elif run.name in keep:
            runs.append(run)
    return runs


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, quiet: bool = False) -> Report:
    from edgequant.examples import mnist1d

    progress = stderr_progress(quiet)
    say = progress or (lambda message: None)

    torch.manual_seed(0)
    epochs = 6 if quick else mnist1d.EPOCHS
    say(
        f"MNIST-1D: generating the data set and training the FP32 CNN ({epochs} epochs; cached after the first run)"
    )
    model = mnist1d.trained_cnn(epochs=epochs, verbose=not quiet)
    calib = mnist1d.calib_batches(256 if quick else 512)
    test = mnist1d.eval_batches("test")

    def accuracy(predict: Predict) -> float:
        correct = total = 0
        for x, y in test:
            correct += int((predict(x).argmax(1) == y).sum())
            total += int(y.shape[0])
        return correct / total

    from edgequant.report.compare import default_runs

    report = compare(
        model,
        calib,
        accuracy,
        example_inputs=calib[0][:8],
        train_data=mnist1d.train_batches(),
        runs=_quick_runs() if quick else default_runs(qat=True, qat_epochs=3),
        tolerance=0.01,
        task="mnist1d-cnn",
        out_dir=out_dir,
        verify_data=[x for x, _ in test],
        latency_runs=10 if quick else 30,
        progress=progress,
    )
    if not quiet:
        print(report.to_markdown().split("## What each method quantized")[0])
        print(
            f"Full report: {Path(out_dir) / 'report.html'} (and report.md); results: {Path(out_dir) / 'results.json'}"
        )
    return report


def main(args: Any) -> int:
    run_demo(args.out, quick=args.quick, quiet=args.quiet)
    return 0
