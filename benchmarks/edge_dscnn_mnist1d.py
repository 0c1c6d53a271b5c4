"""A depthwise-separable 1-D CNN (DS-CNN keyword-spotter layout) on MNIST-1D, W8A8 for mcu-int8,
written by eq.export_tflite and run in TFLite Micro.

The model: a Conv1d stem, two depthwise (groups = channels) + pointwise (1x1) blocks with
BatchNorm and ReLU, global average pooling, Linear; trained by edgequant.examples.mnist1d.train
with its defaults (no setting chosen on the test split). Then the plain calls:
`eq.quantize(model, Recipe.preset("w8a8").for_target("mcu-int8"), calib_batches(512))` and
`eq.export_tflite(qmodel, path, x_test[:1], verify_data=the 1,000 test signals)`, which runs every
signal in TFLite Micro against the integer reference before writing. Reported: accuracy of FP32,
the simulation and the written file in TFLite Micro on the test split, top-1 agreement, the ops
in the file, flash (.tflite bytes) and TFLite Micro's tensor arena.

    OMP_NUM_THREADS=1 flock /tmp/edgequant-bench.lock python benchmarks/edge_dscnn_mnist1d.py \
        [--out benchmarks/results/edge_dscnn_mnist1d.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _resnet20 import predictions  # benchmarks/_resnet20.py
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)
from torch import nn

import edgequant as eq
from edgequant.examples import mnist1d
from edgequant.export.tflite_runtime import TFLiteRunner
from edgequant.recipe import Recipe


class DSCNN1d(nn.Module):
    """Stem conv, two depthwise-separable blocks, average pool, Linear: (N, 1, 40) -> (N, 10)."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2, bias=False), nn.BatchNorm1d(channels), nn.ReLU()
        )
        blocks = []
        for _ in range(2):
            blocks += [
                nn.Conv1d(channels, channels, 5, padding=2, groups=channels, bias=False),
                nn.BatchNorm1d(channels),
                nn.ReLU(),
                nn.Conv1d(channels, channels, 1, bias=False),
                nn.BatchNorm1d(channels),
                nn.ReLU(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        # Global average pooling as keyword spotters write it (exported as Unsqueeze,
        # ReduceMean, Squeeze in ONNX and MEAN in TFLite).
        return self.fc(F.adaptive_avg_pool1d(x, 1).squeeze(-1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/edge_dscnn_mnist1d.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = mnist1d.load_mnist1d()
    start = time.perf_counter()
    model = mnist1d.train(DSCNN1d(), data, threads=1)
    train_s = time.perf_counter() - start
    x_test, y_test = data["x_test"], data["y_test"].numpy()

    start = time.perf_counter()
    qmodel = eq.quantize(
        model, Recipe.preset("w8a8").for_target("mcu-int8"), mnist1d.calib_batches(512)
    )
    path = Path(tempfile.mkdtemp(prefix="eq-dscnn-")) / "dscnn.tflite"
    info = eq.export_tflite(qmodel, path, x_test[:1], verify_data=list(x_test.split(100)))
    quantize_export_s = time.perf_counter() - start
    print(info, flush=True)
    blob = path.read_bytes()
    tflm = TFLiteRunner(blob, "tflite-micro", info.arena_bytes)
    x = x_test.numpy()
    with torch.no_grad():
        fp32 = model(x_test).argmax(1).numpy()
        sim = np.concatenate([qmodel(b).argmax(1).numpy() for b in x_test.split(256)])
    start = time.perf_counter()
    tflm_pred = predictions(tflm, x)
    tflm_s = time.perf_counter() - start
    v = info.verification
    row = {
        "params": sum(p.numel() for p in model.parameters()),
        "train_wall_s": train_s,
        "quantize_and_export_wall_s": quantize_export_s,
        "fp32_acc_test": float((fp32 == y_test).mean()),
        "sim_acc_test": float((sim == y_test).mean()),
        "tflm_acc_test": float((tflm_pred == y_test).mean()),
        "tflm_top1_agreement_vs_sim": float((tflm_pred == sim).mean()),
        "verification": v.__dict__,
        "ops": info.ops,
        "flash_bytes": info.size_bytes,
        "tflm_arena_bytes": info.arena_bytes,
        "tflm_ms_per_signal": 1000 * tflm_s / len(y_test),
    }
    bars = {
        "exports, verifies and runs in TFLite Micro": bool(v.passed),
        "depthwise convolutions in the file": any("DEPTHWISE" in op for op in info.ops),
        "TFLite Micro bit-exact with the integer reference": v.bit_exact == 1.0,
    }
    out = {
        "benchmark": "edge_dscnn_mnist1d",
        "command": "python benchmarks/edge_dscnn_mnist1d.py",
        "results": row,
        "bars": bars,
        "environment": {"torch": torch.__version__, "threads": 1},
    }
    write_json(args.out, out, default=str)
    print(json.dumps(row, default=str), json.dumps(bars, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
