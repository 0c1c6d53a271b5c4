"""Issue 9: the cost of a QAT training step on ResNet-20 (batch 128, 2 threads), side by side in
one interleaved run: the FP32 step (BatchNorm in train mode), edgequant's QAT step (W8A8, W4A4;
LSQ, and EMA), and torch.ao eager QAT (prepare_qat with the default fbgemm/x86 QAT qconfig,
conv+BN fused as torch.ao fuses them).

Each round times `--steps` steps of every method in turn (forward, loss, backward, SGD step);
the figure is the median over rounds of the per-step time, and its ratio to the FP32 step.

    flock /tmp/edgequant-bench.lock python benchmarks/qat_speed.py [--rounds 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _qat import train_step  # benchmarks/_qat.py
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)
from torch import nn

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.examples.shared import shared_dir


def torch_ao_qat(model: nn.Module) -> nn.Module:
    """torch.ao eager-mode QAT: conv+BN pairs fused, default QAT qconfig, prepare_qat."""
    import torch.ao.quantization as tq

    m = copy.deepcopy(model).train()
    pairs = [["conv1", "bn1"]]
    for lname in ("layer1", "layer2", "layer3"):
        for i, _ in enumerate(getattr(m, lname)):
            pairs += [
                [f"{lname}.{i}.conv1", f"{lname}.{i}.bn1"],
                [f"{lname}.{i}.conv2", f"{lname}.{i}.bn2"],
            ]
    m = tq.fuse_modules_qat(m, pairs)
    m.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(m)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    return train_step(model, x, y, lambda params: torch.optim.SGD(params, lr=1e-4, momentum=0.9))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/qat_speed.json")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if shared_dir() is None:
        model = C.resnet20().eval()  # random weights time the same
        x = torch.randn(args.batch, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch,))
        calib = [torch.randn(64, 3, 32, 32) for _ in range(4)]
    else:
        model = C.load_resnet20()
        xs, ys = C.train_split()
        x, y = xs[: args.batch], ys[: args.batch]
        calib = list(C.calibration_split(256)[0].split(64))
    methods: dict[str, Callable[[], None]] = {"fp32": step_fn(copy.deepcopy(model), x, y)}
    for preset in ("w8a8", "w4a4"):
        for rl in ("lsq", "ema"):
            recipe = eq.Recipe.preset(preset).replace(range_learning=rl)
            methods[f"edgequant {preset} {rl}"] = step_fn(
                eq.prepare_qat(model, recipe, calib), x, y
            )
    methods["torch.ao eager qat (w8a8)"] = step_fn(torch_ao_qat(model), x, y)
    for step in methods.values():  # warm-up
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name, step in methods.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
        print(
            f"round {r + 1}/{args.rounds}",
            {k: round(v[-1], 1) for k, v in times.items()},
            flush=True,
        )
    median = {name: statistics.median(v) for name, v in times.items()}
    results = {
        name: {"step_ms": ms, "ratio_vs_fp32": ms / median["fp32"], "all_ms": times[name]}
        for name, ms in median.items()
    }
    for name, row in results.items():
        print(f"{name:32s} {row['step_ms']:8.1f} ms/step  {row['ratio_vs_fp32']:.2f}x FP32")
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "results": results,
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
