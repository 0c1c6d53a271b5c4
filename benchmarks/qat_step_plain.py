"""The QAT step as a user's own training loop sees it (issue 27): ResNet-20 at batch 128, 2
threads; the optimizer (Adam, lr 1e-4, as fit_qat's default) built once; forward,
cross-entropy, backward, step. Every round runs `--steps` steps of every model in turn (rotating
order); the figure is the median over `--rounds` rounds of the per-step time, and its ratio to
the FP32 step of the same network.

Two networks: the project's pretrained ResNet-20 (edgequant.examples.cifar10) and a ResNet-20
written in another style (functional ReLUs, option-A shortcuts with F.pad, adaptive pooling and
flatten; random weights: the step's cost does not depend on them). QAT models come from
eq.prepare_qat(model, preset, calib_data=..., start="calibrated"): the start's weights change
nothing in the cost of a step, and the PTQ-pipeline start would only add minutes of set-up.

    flock /tmp/edgequant-bench.lock python benchmarks/qat_step_plain.py [--rounds 8] [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _qat import train_step  # benchmarks/_qat.py
from _results import (  # benchmarks/_results.py
    cpu_description,
    interleaved_rounds,
    timed,
    write_json,
)
from torch import nn

import edgequant as eq
from edgequant.examples import cifar10 as C


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        short = x if self.stride == 1 else x[:, :, ::2, ::2]
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class OtherResNet20(nn.Module):
    """A CIFAR ResNet-20 written differently from edgequant's own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        widths = [16] * 3 + [32] * 3 + [64] * 3
        blocks, cin = [], 16
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 2 if i in (3, 6) else 1))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    return train_step(model, x, y, lambda params: torch.optim.Adam(params, lr=1e-4))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/qat_step_plain.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    calib = [torch.randn(64, 3, 32, 32) for _ in range(4)]
    try:
        ours = C.load_resnet20().eval()
    except FileNotFoundError as err:
        print(f"skipped the project's ResNet-20: {err}")
        ours = C.resnet20().eval()
    nets = {"edgequant ResNet-20": ours, "ResNet-20 written elsewhere": OtherResNet20().eval()}
    steps: dict[str, Callable[[], None]] = {}
    for net, model in nets.items():
        steps[f"{net} / fp32"] = step_fn(copy.deepcopy(model), x, y)
        for preset in ("w8a8", "w4a4"):
            qmodel = eq.prepare_qat(model, preset, calib_data=calib, start="calibrated")
            steps[f"{net} / {preset}"] = step_fn(qmodel, x, y)
    for step in steps.values():  # warm-up (and any first-call compilation)
        for _ in range(3):
            step()
    names = list(steps)
    times = interleaved_rounds(
        {name: timed(step, args.steps) for name, step in steps.items()}, args.rounds
    )
    rows = {}
    for name in names:
        net = name.split(" / ")[0]
        ms = statistics.median(times[name]) * 1000
        fp32 = statistics.median(times[f"{net} / fp32"]) * 1000
        rows[name] = {"step_ms": ms, "vs_fp32": ms / fp32}
        print(f"{name:40s} {ms:7.1f} ms  {ms / fp32:.2f}x", flush=True)
    write_json(
        args.out,
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{cpu_description(2)}, load average {os.getloadavg()[0]:.1f} at the end",
            "torch": torch.__version__,
            "how": f"batch 128, Adam lr 1e-4 built once, median of {args.rounds} interleaved "
            f"rounds of {args.steps} steps",
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
