"""One writer for the benchmarks' results files: atomic (a temp file beside it, then a rename),
so a run cut off mid-write leaves the previous file whole, never half of a JSON document."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgequant._io import atomic_write_text


def write_json(path: str | os.PathLike[str], data: Any, **dumps: Any) -> None:
    """json.dumps(data, indent=1, **dumps) to `path`, its folder created, atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, **{"indent": 1, **dumps}))


def cpu_description(threads: int | None = None) -> str:
    """The CPU a speed figure was taken on: its model name and the x86 features that decide ONNX
    Runtime's 8-bit kernels (VNNI or not changes both the kernel and its exactness), e.g.
    "x86_64 AMD EPYC (avx2, avx512f, avx512_vnni), 2 threads"."""
    import platform

    from edgequant.export.int8_kernels import INT8_CPU_FLAGS, cpu_int8_flags

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = " " + line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_int8_flags()
    feats = "" if flags is None else f" ({', '.join(f for f in INT8_CPU_FLAGS if f in flags)})"
    return f"{platform.machine()}{name}{feats}" + (f", {threads} threads" if threads else "")


def cifar_missing() -> bool:
    """True, after saying so on stderr, where ../shared (CIFAR-10, ResNet-20 weights) is absent:
    the caller skips (exit 0) rather than fail on a fresh clone."""
    from edgequant.examples.shared import shared_dir

    if shared_dir() is not None:
        return False
    print(
        "skipped: ../shared (CIFAR-10, ResNet-20 weights) is absent; set EDGEQUANT_SHARED",
        file=sys.stderr,
    )
    return True


def timed(fn: Callable[[], Any], calls: int = 1) -> Callable[[], float]:
    """A measure for interleaved_rounds: the seconds one call of `fn` takes, averaged over
    `calls` calls."""

    def measure() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    return measure


def interleaved_rounds(
    measures: dict[str, Callable[[], float]], rounds: int
) -> dict[str, list[float]]:
    """Every measure once a round for `rounds` rounds, in a rotating order, so that a slow spell
    of the shared machine falls on all alike; each name's values in round order."""
    names = list(measures)
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            values[name].append(measures[name]())
    return values
