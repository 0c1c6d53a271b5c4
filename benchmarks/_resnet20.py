"""The setup the ResNet-20 benchmarks share: their command line, the pretrained ResNet-20 of
../shared with its 512 calibration images of train_4660, and the two CIFAR-10 test sets."""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.recipe import Recipe

EvalSets = dict[str, tuple[np.ndarray, np.ndarray]]


def batch1_median_ms(run_one: Callable[[], Any], repeats: int = 200, warmup: int = 20) -> float:
    """Median wall time of `run_one()` in milliseconds, after `warmup` calls: the batch-1
    latency of an edge runtime's interpreter, whatever its call."""
    for _ in range(warmup):
        run_one()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def predictions(runner: Any, x: np.ndarray) -> np.ndarray:
    """Top-1 classes of an edge runner (`runner.run([batch])[0]` gives its logits), 256 at a
    time."""
    return np.concatenate(
        [runner.run([x[i : i + 256]])[0] for i in range(0, x.shape[0], 256)]
    ).argmax(1)


def resnet20_parser(
    doc: str, out: str, quick_help: str = "skip the JPEG test set"
) -> argparse.ArgumentParser:
    """--out (default `out`) and --quick, described by the first line of the script's `doc`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=out)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


@dataclass(frozen=True)
class ResNet20Cifar:
    """The float model, its calibration images (whole and in batches of 64) and test_932."""

    model: torch.nn.Module
    x_cal: torch.Tensor
    calib: list[torch.Tensor]
    x932: torch.Tensor
    y932: torch.Tensor


def load_resnet20_cifar(threads: int | None = 2) -> ResNet20Cifar:
    """torch on `threads` threads (None: left as it is), seed 0, then the model and the images."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = C.load_resnet20()
    x_cal, _ = C.calibration_split(512)
    x932, y932 = C.load_split("test_932")
    return ResNet20Cifar(model, x_cal, list(x_cal.split(64)), x932, y932)


def quantize_mcu_int8(data: ResNet20Cifar) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The plain call the edge benchmarks deploy: static PTQ of the model for the `mcu-int8`
    target's W8A8, every other setting the default, on the 512 calibration images; with the
    first fields of the benchmark's row (target, grids, images, wall time)."""
    start = time.perf_counter()
    recipe = Recipe.preset("w8a8").for_target("mcu-int8")
    qmodel = eq.quantize(data.model, recipe, data.calib, method="static")
    assert recipe.weight is not None and recipe.activation is not None
    return qmodel, {
        "target": "mcu-int8",
        "weights": recipe.weight.short(),
        "activations": recipe.activation.short(),
        "calibration_images": len(data.x_cal),
        "quantize_wall_s": time.perf_counter() - start,
    }


def results_head(machine_note: str = "") -> dict[str, Any]:
    """The head of a results file of the ONNX Runtime ResNet-20 benchmarks that calibrate with
    minmax observers: date, machine (then `machine_note`), versions, the calibration."""
    import platform

    import onnxruntime

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}{machine_note}",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "calibration": "512 images of train_4660 (calibration part), minmax observers",
    }


def best_latency_ms(
    runners: dict[str, Any], latency_ms: Callable[[Any, np.ndarray], float], x: np.ndarray
) -> dict[str, float]:
    """Each runner's batch-1 latency `latency_ms(runner, x)`, the best of 3 interleaved rounds
    (_results.interleaved_rounds), so that all see the same machine load."""
    from _results import interleaved_rounds

    measures = {name: functools.partial(latency_ms, runner, x) for name, runner in runners.items()}
    return {name: min(t) for name, t in interleaved_rounds(measures, 3).items()}


def peer_bars(
    preset: str, ours: dict[str, Any], peer: dict[str, Any], runtime: str
) -> tuple[dict[str, bool], float]:
    """The bars against a peer's file in the same runtime (`runtime`_acc_test_932 and
    `runtime`_latency_ms_bs1 in each row): W8A8 at least as accurate and >= 0.95x the peer's
    speed, W4A8 >= 3 points ahead; and our speed relative to the peer's. Records the points
    ahead in `ours`."""
    gap = ours[f"{runtime}_acc_test_932"] - peer[f"{runtime}_acc_test_932"]
    speed = peer[f"{runtime}_latency_ms_bs1"] / ours[f"{runtime}_latency_ms_bs1"]
    ours["points_ahead_of_peer_test_932"] = 100 * gap
    if preset == "w8a8":
        return {
            "w8a8: ours at least as accurate on test_932": gap >= 0,
            "w8a8: ours >= 0.95x the peer's speed": speed >= 0.95,
        }, speed
    return {"w4a8: ours >= 3 points ahead on test_932": gap >= 0.03}, speed


def edge_results(
    script: str, quick: bool, results: Any, bars: dict[str, Any], threads: int, **extra: Any
) -> dict[str, Any]:
    """A results file of the edge benchmarks: the script and its command, the results, `extra`,
    the bars and the environment (torch, CPU, the runtime's threads)."""
    import platform

    return {
        "benchmark": script,
        "command": f"python benchmarks/{script}.py" + (" --quick" if quick else ""),
        "results": results,
        **extra,
        "bars": bars,
        "environment": {
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": threads,
        },
    }


def eval_sets(data: ResNet20Cifar, quick: bool) -> EvalSets:
    """test_932 and, unless `quick`, the 10,000 JPEG images, as numpy (images, labels)."""
    sets: EvalSets = {"test_932": (data.x932.numpy(), data.y932.numpy())}
    if not quick:
        xj, yj = C.load_jpeg_test()
        sets["jpeg_10000"] = (xj.numpy(), yj.numpy())
    return sets


def evaluate_onnx(
    results: dict[str, Any], name: str, path: Path, test_sets: EvalSets, extra: dict[str, Any]
) -> None:
    """results[name]: the ONNX file's accuracy in ONNX Runtime on each test set, its size and
    `extra`; printed as it lands."""
    fn = C.ort_predict_fn(path)
    row = {f"acc_{k}": C.accuracy(fn, x, y) for k, (x, y) in test_sets.items()}
    row.update(size_bytes=path.stat().st_size, **extra)
    results[name] = row
    print(name, json.dumps(row), flush=True)


def ort_quantize_static(
    fp32_path: Path,
    out_path: Path,
    calib: np.ndarray,
    weight_type: str = "int8",
    activation_type: str = "uint8",
) -> float:
    """ONNX Runtime's quantize_static (MinMax, per-channel, QDQ) of the float file, calibrated on
    `calib` in batches of 64; the types by name ("int8", "uint8", "int4", "uint4"). Returns the
    wall time in seconds, pre-processing included."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {
        "int8": QuantType.QInt8,
        "uint8": QuantType.QUInt8,
        "int4": QuantType.QInt4,
        "uint4": QuantType.QUInt4,
    }
    name = (
        ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        .get_inputs()[0]
        .name
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calib[i : i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    start = time.perf_counter()
    pre = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(
        str(pre),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=types[activation_type],
        weight_type=types[weight_type],
        calibrate_method=CalibrationMethod.MinMax,
    )
    return time.perf_counter() - start
