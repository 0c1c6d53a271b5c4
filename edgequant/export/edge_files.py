"""A .tflite or .pte file read back: what it holds (`inspect_edge`: flash size, TFLite Micro's
tensor arena, ops, the integer input and output grids) and how fast its runtime runs it at its
own batch size (`edge_latency_ms`: LiteRT's default path, XNNPACK, for .tflite; ExecuTorch's
runtime for .pte). The CLI's `inspect` and `bench` call these for the two suffixes."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EDGE_SUFFIXES", "EdgeFileReport", "edge_latency_ms", "inspect_edge"]

EDGE_SUFFIXES = {".tflite": "tflite", ".pte": "pte"}

# ExecuTorch's ScalarType codes for the dtypes our programs take and give.
_ET_DTYPES = {0: np.uint8, 1: np.int8, 3: np.int32, 4: np.int64, 6: np.float32}


@dataclass
class EdgeFileReport:
    """What `inspect_edge` found; `format()` prints it, `to_dict()` serializes it."""

    path: str
    kind: str  # "tflite" or "pte"
    size_bytes: int  # the file: flash on a microcontroller
    # Each input and output: shape, dtype, and for an int8 tensor its scale and zero point.
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)  # .tflite: op names in execution order
    float_ops: list[str] = field(default_factory=list)  # .tflite: ops reading a float tensor
    arena_bytes: int | None = None  # .tflite: TFLite Micro's smallest tensor arena (RAM)
    delegate_calls: int | None = None  # .pte: XNNPACK delegate calls (0: nothing delegated)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"file:          {self.path} ({self.kind})",
            f"size (flash):  {self.size_bytes} B",
        ]
        if self.arena_bytes is not None:
            lines.append(f"arena (RAM):   {self.arena_bytes} B (TFLite Micro)")
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            for i, t in enumerate(tensors):
                grid = (
                    f", scale {t['scale']:.6g}, zero point {t['zero_point']}"
                    if t.get("scale")
                    else ""
                )
                lines.append(f"{kind} {i}:{' ' * (8 - len(kind))}{t['dtype']} {t['shape']}{grid}")
        if self.ops:
            counts: dict[str, int] = {}
            for op in self.ops:
                counts[op] = counts.get(op, 0) + 1
            lines.append(
                f"ops:           {len(self.ops)} ("
                + ", ".join(f"{op} {n}" for op, n in sorted(counts.items()))
                + ")"
            )
            lines.append(
                "integer:       "
                + ("yes" if not self.float_ops else f"no: {', '.join(self.float_ops[:5])}")
            )
        if self.delegate_calls is not None:
            lines.append(f"XNNPACK:       {self.delegate_calls} delegate calls")
        return "\n".join(lines)


def _edge_file(path: str | os.PathLike[str]) -> tuple[Path, str, bytes]:
    """(path, format, bytes) of a .tflite / .pte file; FileNotFoundError / ValueError naming it."""
    p = Path(path)
    kind = EDGE_SUFFIXES.get(p.suffix)
    if kind is None:
        raise ValueError(f"{p}: not a .tflite or .pte file")
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if not p.is_file():
        raise ValueError(f"{p} is not a {p.suffix} model: it is not a file")
    data = p.read_bytes()
    if not data:
        raise ValueError(f"{p} is not a {p.suffix} model: the file is empty")
    return p, kind, data


def inspect_edge(path: str | os.PathLike[str]) -> EdgeFileReport:
    """Report what a .tflite or .pte file holds (ValueError naming the file if its runtime
    cannot load it)."""
    p, kind, data = _edge_file(path)
    try:
        return _inspect_tflite(p, data) if kind == "tflite" else _inspect_pte(p, data)
    except Exception as err:  # the runtimes raise ValueError, RuntimeError... on a bad file
        raise ValueError(f"{p} is not a {p.suffix} model its runtime loads: {err}") from err


def _tflite_tensor(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail["quantization"]
    entry: dict[str, Any] = {
        "shape": [int(d) for d in detail["shape"]],
        "dtype": np.dtype(detail["dtype"]).name,
    }
    if scale:
        entry.update(scale=float(scale), zero_point=int(zero_point))
    return entry


def _inspect_tflite(p: Path, data: bytes) -> EdgeFileReport:
    from edgequant.export.tflite_runtime import litert_interpreter, tensor_ops, tflm_arena_bytes

    it = litert_interpreter(data)
    ops, float_ops = tensor_ops(data)
    try:
        arena: int | None = tflm_arena_bytes(data)
    except Exception:  # TFLite Micro cannot run every file LiteRT can (float ops): no arena
        arena = None
    return EdgeFileReport(
        path=str(p),
        kind="tflite",
        size_bytes=len(data),
        inputs=[_tflite_tensor(d) for d in it.get_input_details()],
        outputs=[_tflite_tensor(d) for d in it.get_output_details()],
        ops=ops,
        float_ops=float_ops,
        arena_bytes=arena,
    )


def _pte_tensors(count: int, tensor_meta: Callable[[int], Any]) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        t = tensor_meta(i)
        dtype = _ET_DTYPES.get(int(t.dtype()))
        out.append(
            {
                "shape": [int(s) for s in t.sizes()],
                "dtype": np.dtype(dtype).name if dtype else f"ScalarType {int(t.dtype())}",
            }
        )
    return out


def _inspect_pte(p: Path, data: bytes) -> EdgeFileReport:
    from edgequant.export.executorch import ExecuTorchRunner, delegated_ops

    meta = ExecuTorchRunner(data).method.metadata
    return EdgeFileReport(
        path=str(p),
        kind="pte",
        size_bytes=len(data),
        inputs=_pte_tensors(meta.num_inputs(), meta.input_tensor_meta),
        outputs=_pte_tensors(meta.num_outputs(), meta.output_tensor_meta),
        delegate_calls=delegated_ops(data),
    )


def _random_input(shape: list[int], dtype: Any, rng: np.random.Generator) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    # int8: a whole quantized grid; other integers (token ids, indices): small non-negative ones.
    low = -128 if np.dtype(dtype) == np.int8 else 0
    return rng.integers(low, 128, size=shape).astype(dtype)


def edge_latency_ms(
    path: str | os.PathLike[str], warmup: int = 5, runs: int = 30, threads: int = 2, seed: int = 0
) -> dict[str, float]:
    """Median wall time of one invoke in milliseconds, keyed by the file's batch size ('bs1'),
    on random inputs of the file's shapes: .tflite in LiteRT's default path (XNNPACK), .pte in
    ExecuTorch's runtime, each on `threads` threads."""
    if warmup < 0 or runs < 1 or threads < 1:
        raise ValueError(
            f"need warmup >= 0, runs >= 1, threads >= 1; got {warmup}, {runs}, {threads}"
        )
    p, kind, data = _edge_file(path)
    rng = np.random.default_rng(seed)
    try:
        call, batch = (_tflite_call if kind == "tflite" else _pte_call)(data, threads, rng)
    except Exception as err:  # the runtimes raise ValueError, RuntimeError... on a bad file
        raise ValueError(f"{p} is not a {p.suffix} model its runtime loads: {err}") from err
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {f"bs{batch}": statistics.median(times) * 1000.0}


def _tflite_call(
    data: bytes, threads: int, rng: np.random.Generator
) -> tuple[Callable[[], Any], int]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data, num_threads=threads)
    it.allocate_tensors()
    details = it.get_input_details()
    for d in details:
        it.set_tensor(d["index"], _random_input(list(d["shape"]), d["dtype"], rng))
    batch = int(details[0]["shape"][0]) if len(details[0]["shape"]) else 1
    return it.invoke, batch


def _pte_call(data: bytes, threads: int, rng: np.random.Generator) -> tuple[Callable[[], Any], int]:
    import torch
    from executorch.extension.pybindings import portable_lib

    from edgequant.export.executorch import ExecuTorchRunner

    portable_lib._unsafe_reset_threadpool(threads)  # before the program loads
    runner = ExecuTorchRunner(data)
    meta = runner.method.metadata
    inputs = []
    for i in range(meta.num_inputs()):
        t = meta.input_tensor_meta(i)
        dtype = _ET_DTYPES.get(int(t.dtype()), np.float32)
        inputs.append(torch.from_numpy(_random_input([int(s) for s in t.sizes()], dtype, rng)))
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    return (lambda: runner.method.execute(inputs)), batch
