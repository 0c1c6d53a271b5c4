"""One writer for the benchmarks' results files: atomic (a temp file beside it, then a rename),
so a run cut off mid-write leaves the previous file whole, never half of a JSON document."""

from __future__ import annotations

import contextlib
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


def timed(fn: Callable[[], Any], calls: int = 1, warm: int = 0) -> Callable[[], float]:
    """A measure for interleaved_rounds: the seconds one call of `fn` takes, averaged over
    `calls` calls, after `warm` untimed calls."""

    def measure() -> float:
        for _ in range(warm):
            fn()
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


def _session_worker(path: str, threads: int, spin: bool, conn: Any) -> None:
    """One ONNX Runtime session in its own process, as deployed (ORT's default options but the
    thread count, and spin=False: worker threads that block instead of spinning): for each
    (feeds, warm, calls) it receives, `warm` untimed runs, then the mean seconds of `calls` timed
    ones sent back; None stops it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    while (job := conn.recv()) is not None:
        feeds, warm, calls = job
        feeds = {k: v for k, v in feeds.items() if k in names}
        for _ in range(warm):
            session.run(None, feeds)
        start = time.perf_counter()
        for _ in range(calls):
            session.run(None, feeds)
        conn.send((time.perf_counter() - start) / calls)


def interleaved_session_ms(
    paths: dict[str, Any],
    batches: dict[str, dict[str, Any]],
    rounds: int = 21,
    threads: int = 2,
    warm: int = 2,
    calls: int = 3,
    spin: bool = True,
) -> dict[str, dict[str, float]]:
    """Median ms of one ONNX Runtime run of each file on each batch ({label: {input: numpy}}),
    every file in a process of its own with one session (ORT's defaults, `threads` intra-op
    threads), as a deployed model runs; one file at a time, `warm` untimed runs then the mean of
    `calls` timed ones, every file once per round in a rotating order (interleaved_rounds).

    Several sessions in one process gave unstable times on this 2-core VM: ORT's spinning worker
    threads of one session slowed another's runs by up to 1.8x, by amounts that changed from run
    to run and with the number of sessions, and most for graphs of many nodes. spin=False
    (session.intra_op.allow_spinning 0) measures the same files with worker threads that block
    when idle: the steadier figure on a shared or virtual machine."""
    import multiprocessing as mp
    import statistics

    ctx = mp.get_context("spawn")
    workers = {}
    try:
        for name, path in paths.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_session_worker, args=(str(path), threads, spin, child))
            proc.start()
            workers[name] = (proc, parent)
        result: dict[str, dict[str, float]] = {name: {} for name in paths}
        for label, feeds in batches.items():

            def measure(name: str, feeds: dict[str, Any] = feeds) -> Callable[[], float]:
                def run() -> float:
                    workers[name][1].send((feeds, warm, calls))
                    return float(workers[name][1].recv())

                return run

            for name in paths:  # warm-up: load, first runs
                measure(name)()
            times = interleaved_rounds({name: measure(name) for name in paths}, rounds)
            for name in paths:
                result[name][label] = statistics.median(times[name]) * 1000.0
        return result
    finally:
        for proc, conn in workers.values():
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
