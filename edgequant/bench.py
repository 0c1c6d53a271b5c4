"""Latency and size of exported ONNX models, measured in ONNX Runtime on the CPU."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "compare_latency",
    "decode_speed",
    "file_size_bytes",
    "latency_ms",
    "model_weight_report",
]

# A shape per input name; None entries stand for the batch size, e.g. {"input_ids": (None, 128)}.
InputShapes = Mapping[str, Sequence[int | None]]

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def file_size_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk; for an ONNX model, its external-data files count too."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.endswith(".onnx"):
        # export/inspect.py imports onnx: imported on use, so that importing edgequant does not.
        from edgequant.export.inspect import file_size_bytes as onnx_file_size_bytes

        return onnx_file_size_bytes(path)
    return os.path.getsize(path)


def model_weight_report(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `edgequant inspect` prints, as a dict (see `InspectReport.to_dict`)."""
    from edgequant.export.inspect import inspect_onnx  # imports onnx: on use

    return inspect_onnx(onnx_path).to_dict()


def latency_ms(
    onnx_path: str | os.PathLike[str],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 5,
    runs: int = 30,
    threads: int = 2,
    input_shapes: InputShapes | None = None,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Median wall time of `session.run` in milliseconds, keyed 'bs1', 'bs64', ...

    Inputs are random, built from the model's input signature: a dynamic first dimension takes
    the batch size; any other dynamic dimension needs `input_shapes`.
    """
    _check_timing_args(batch_sizes, warmup, runs, threads)
    session = ort_session(onnx_path, threads)
    rng = np.random.default_rng(seed)
    result = {}
    for batch_size in batch_sizes:
        feeds = _random_feeds(session, batch_size, input_shapes, rng)
        for _ in range(warmup):
            session.run(None, feeds)
        times_s = [_time_run(session, feeds) for _ in range(runs)]
        result[f"bs{batch_size}"] = statistics.median(times_s) * 1000.0
    return result


def compare_latency(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 5,
    runs: int = 30,
    threads: int = 2,
    input_shapes: InputShapes | None = None,
    *,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Time two models interleaved; returns {"a": latency, "b": latency, "ratio": b / a}.

    The runs alternate between the models (and which goes first), so a slow spell of the machine
    falls on both alike; the ratio is steadier than two separate `latency_ms` calls. Each timed
    run follows an untimed one of the same model (_warm_time_run): right after a run of the other
    model, its thread pool still spins and slows the next run by up to 2x, the more so the more
    nodes a graph has, which no single-model deployment sees.
    """
    _check_timing_args(batch_sizes, warmup, runs, threads)
    session_a = ort_session(a, threads)
    session_b = ort_session(b, threads)
    same_inputs = _signature(session_a) == _signature(session_b)
    rng = np.random.default_rng(seed)
    result: dict[str, dict[str, float]] = {"a": {}, "b": {}, "ratio": {}}
    for batch_size in batch_sizes:
        feeds_a = _random_feeds(session_a, batch_size, input_shapes, rng)
        feeds_b = (
            feeds_a if same_inputs else _random_feeds(session_b, batch_size, input_shapes, rng)
        )
        for _ in range(warmup):
            session_a.run(None, feeds_a)
            session_b.run(None, feeds_b)
        times_a, times_b = [], []
        for run in range(runs):
            if run % 2 == 0:
                times_a.append(_warm_time_run(session_a, feeds_a))
                times_b.append(_warm_time_run(session_b, feeds_b))
            else:
                times_b.append(_warm_time_run(session_b, feeds_b))
                times_a.append(_warm_time_run(session_a, feeds_a))
        key = f"bs{batch_size}"
        result["a"][key] = statistics.median(times_a) * 1000.0
        result["b"][key] = statistics.median(times_b) * 1000.0
        result["ratio"][key] = result["b"][key] / result["a"][key]
    return result


def _check_timing_args(batch_sizes: Sequence[int], warmup: int, runs: int, threads: int) -> None:
    if not batch_sizes or any(not isinstance(bs, int) or bs < 1 for bs in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def ort_session(path: str | os.PathLike[str], threads: int) -> onnxruntime.InferenceSession:
    """A CPU session with `threads` intra-op threads; ValueError naming the file if ORT refuses it."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not an ONNX model: it is not a file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's warnings (unused initializers, ...) are not actionable here.
    options.log_severity_level = 3
    load_errors = (
        ort_errors.Fail,
        ort_errors.InvalidArgument,
        ort_errors.InvalidGraph,
        ort_errors.InvalidProtobuf,
        ort_errors.NoSuchFile,
        ort_errors.NotImplemented,
        ort_errors.RuntimeException,
    )
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except ort_errors.InvalidProtobuf as error:
        raise ValueError(f"{path} is not an ONNX model: ONNX Runtime cannot parse it") from error
    except load_errors as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: ONNX Runtime cannot load it: {message}") from error


def _signature(session: onnxruntime.InferenceSession) -> list[tuple[str, str, tuple[Any, ...]]]:
    return [(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()]


def _time_run(session: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - start


def _warm_time_run(session: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    """_time_run after one untimed run of the same session: the steady state of one model, not
    the wake-up of its thread pool beside another session's still-spinning one."""
    session.run(None, feeds)
    return _time_run(session, feeds)


def _input_shape(
    name: str, dims: Sequence[Any], batch_size: int, input_shapes: InputShapes | None
) -> tuple[int, ...]:
    """Concrete shape of one input at `batch_size` (ORT gives dynamic dims as str or None)."""
    if input_shapes is not None and name in input_shapes:
        given = list(input_shapes[name])
        if len(given) != len(dims):
            raise ValueError(
                f"input_shapes[{name!r}] has {len(given)} dimensions, the model's input "
                f"{name!r} has {len(dims)}: {list(dims)}"
            )
        return tuple(batch_size if dim is None else int(dim) for dim in given)
    shape = []
    for position, dim in enumerate(dims):
        if isinstance(dim, int) and dim >= 0:
            if position == 0 and dim != batch_size:
                raise ValueError(
                    f"input {name!r} has a fixed batch dimension of {dim}, so it cannot run at "
                    f"batch size {batch_size}; pass batch_sizes=({dim},) or export with a dynamic batch"
                )
            shape.append(dim)
        elif position == 0:
            shape.append(batch_size)
        else:
            raise ValueError(
                f"input {name!r} has a dynamic dimension {dim!r} at position {position} "
                f"(shape {list(dims)}); give its size with input_shapes={{{name!r}: (None, ...)}}"
            )
    return tuple(shape)


def _random_feeds(
    session: onnxruntime.InferenceSession,
    batch_size: int,
    input_shapes: InputShapes | None,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    feeds = {}
    for info in session.get_inputs():
        shape = _input_shape(info.name, info.shape, batch_size, input_shapes)
        if info.type not in _ORT_DTYPES:
            raise ValueError(
                f"input {info.name!r} has type {info.type}; random inputs are built only for "
                f"{sorted(_ORT_DTYPES)}"
            )
        dtype = _ORT_DTYPES[info.type]
        lowered = info.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_ or "mask" in lowered:
            # Attention masks: attend everywhere.
            feeds[info.name] = np.ones(shape, dtype=dtype)
        elif "token_type" in lowered or "segment" in lowered:
            feeds[info.name] = np.zeros(shape, dtype=dtype)
        else:
            # Token ids, positions, pre-quantized inputs: small values valid for any vocabulary.
            feeds[info.name] = rng.integers(0, 100, size=shape).astype(dtype)
    return feeds


def _kv_inputs(session: onnxruntime.InferenceSession) -> list[tuple[str, int, int]]:
    """(name, kv heads, head dim) of each past_key_i / past_value_i input of an LM export
    (export/lm.py), in the graph's order."""
    found = []
    for name, _, shape in _signature(session):
        if name.startswith(("past_key_", "past_value_")):
            if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise ValueError(f"input {name!r} has shape {shape}, not (batch, heads, past, dim)")
            found.append((name, int(shape[1]), int(shape[3])))
    if not found:
        raise ValueError(
            "the model has no past_key_i / past_value_i inputs: decode_speed takes a causal LM "
            "exported with its KV cache (export_lm_onnx)"
        )
    return found


def _decode_tokens_per_s(
    session: onnxruntime.InferenceSession, prompt_tokens: int, new_tokens: int
) -> float:
    """Tokens per second generating `new_tokens` greedily, one at a time, after a prefill of
    `prompt_tokens` (not timed)."""
    kv = _kv_inputs(session)
    outputs = ["logits"] + [name.replace("past_", "present_", 1) for name, _, _ in kv]
    feeds: dict[str, np.ndarray] = {n: np.zeros((1, h, 0, d), np.float32) for n, h, d in kv}
    feeds["input_ids"] = (np.arange(prompt_tokens, dtype=np.int64) % 97 + 3).reshape(1, -1)
    out = session.run(outputs, feeds)
    start = time.perf_counter()
    for _ in range(new_tokens):
        feeds = {name: out[1 + i] for i, (name, _, _) in enumerate(kv)}
        feeds["input_ids"] = np.array([[int(out[0][0, -1].argmax())]], dtype=np.int64)
        out = session.run(outputs, feeds)
    return new_tokens / (time.perf_counter() - start)


def decode_speed(
    onnx_path: str | os.PathLike[str],
    prompt_tokens: int = 32,
    new_tokens: int = 16,
    runs: int = 3,
    threads: int = 2,
) -> dict[str, float]:
    """A causal LM's decode speed at batch 1 with its KV cache (a file of export_lm_onnx), and
    its peak memory: measured in a fresh process, so that the peak is this model's alone.

    Returns {"tokens_per_s": the median of `runs` greedy generations of `new_tokens` tokens after
    a `prompt_tokens` prefill, "ms_per_token": its inverse, "peak_memory_bytes": the process's
    peak resident memory while the session loads and decodes, above what it held after
    importing ONNX Runtime}."""
    import json
    import subprocess
    import sys

    _check_timing_args((1,), 0, runs, threads)
    for label, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    path = os.fspath(onnx_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    # The child runs this file alone (runpy), not the edgequant package: importing torch there
    # would cost seconds and count in its memory.
    args = json.dumps([path, prompt_tokens, new_tokens, runs, threads])
    code = f"import runpy; runpy.run_path({__file__!r})['_decode_child']({args!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
        raise ValueError(f"{path}: decoding in ONNX Runtime failed: {tail[0]}")
    return cast(dict[str, float], json.loads(done.stdout.strip().splitlines()[-1]))


def _memory_kb(field: str) -> int | None:
    """A field of /proc/self/status in kilobytes (VmRSS: resident now; VmHWM: its peak), or
    None where there is no such file (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _decode_child(args: str) -> None:
    """decode_speed's measuring process: prints its result as one line of JSON."""
    import json

    path, prompt_tokens, new_tokens, runs, threads = json.loads(args)
    import onnxruntime  # noqa: F401  (its own memory is not the model's)

    # The peak from here on: Linux resets VmHWM to the resident memory now on "5" written to
    # clear_refs. (ru_maxrss would not do: it keeps the parent's peak across fork and exec.)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _memory_kb("VmRSS")
    except OSError:
        before = None
    session = ort_session(path, threads)
    _decode_tokens_per_s(session, prompt_tokens, 2)  # warm-up
    speeds = [_decode_tokens_per_s(session, prompt_tokens, new_tokens) for _ in range(runs)]
    peak = _memory_kb("VmHWM")
    if before is None or peak is None:
        raise OSError("peak memory needs Linux's /proc/self/status and clear_refs")
    speed = statistics.median(speeds)
    result = {
        "tokens_per_s": speed,
        "ms_per_token": 1000.0 / speed,
        "peak_memory_bytes": max(peak - before, 0) * 1024,
    }
    print(json.dumps(result))
