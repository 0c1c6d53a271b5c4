"""The TFLite side of export_tflite: the converter (litert-torch), the runtimes that run a
.tflite (LiteRT with reference kernels, TFLite Micro and its arena size), what a file's ops and
tensors are, and the float-I/O twin of an int8 model.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgequant.export.lower import ExportError


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """The converter and TFLite Micro print from C++ straight to file descriptors 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            _flush_c_stdio()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def convert_program(
    program: torch.export.ExportedProgram, args: tuple[Any, ...], quantized: bool = True
) -> bytes:
    """The .tflite bytes of a PT2E program (litert-torch in static quantization mode), or of a
    float program (quantized=False: the FP32 baseline)."""
    import litert_torch
    from litert_torch import _config
    from litert_torch.quantize import pt2e_quantizer, quant_config

    # The quantizer only switches the converter to static Q/DQ lowering: the graph already
    # holds every scale, so nothing is calibrated.
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    )
    show = _config.config.show_progress
    _config.config.show_progress = False
    try:
        with silenced():
            edge = litert_torch.convert(
                program.module(),
                args,
                quant_config=quant_config.QuantConfig(quantizer) if quantized else None,
            )
            return bytes(edge.model_content())
    except Exception as err:  # the converter raises many types; say which stage failed
        raise ExportError(f"litert-torch could not convert: {type(err).__name__}: {err}") from err
    finally:
        _config.config.show_progress = show


def litert_interpreter(model: bytes | str, reference: bool = True, keep_all: bool = False) -> Any:
    """LiteRT's interpreter on the file: reference kernels (BUILTIN_REF, what TFLite Micro
    computes) or the default optimized ones (XNNPACK)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
    it = Interpreter(
        **source,
        experimental_op_resolver_type=kind,
        experimental_preserve_all_tensors=keep_all,
        num_threads=1,
    )
    it.allocate_tensors()
    return it


def tflm_interpreter(model: bytes, arena_bytes: int | None = None) -> Any:
    from tflite_micro.python.tflite_micro import runtime

    with silenced():
        return runtime.Interpreter.from_bytes(model, arena_size=arena_bytes)


def _flush_c_stdio() -> None:
    """C's stdio buffers what TFLite Micro prints; flush it before the descriptor moves back."""
    import ctypes

    ctypes.CDLL(None).fflush(None)


_ARENA_SEARCH = """
import sys
from tflite_micro.python.tflite_micro import runtime

interpreter = runtime.Interpreter.from_file(sys.argv[1])
sys.stdout.flush()
interpreter.print_allocations()
"""

_ARENA_REFINE = """
import sys
from tflite_micro.python.tflite_micro import runtime

def fits(size):
    print("try", size, flush=True)  # TFLite Micro may abort on a small arena: the parent sees
    try:
        runtime.Interpreter.from_file(sys.argv[1], arena_size=size)
        return True
    except RuntimeError:
        return False

low = int(sys.argv[2])  # known not to be enough
high = int(sys.argv[3]) or None  # known to be enough (0: none known)
step = 16
while high is None:
    if fits(low + step):
        high = low + step
    else:
        low, step = low + step, step * 2
while high - low > 16:
    mid = (low + high) // 32 * 16
    if mid <= low:
        break
    if fits(mid):
        high = mid
    else:
        low = mid
    print("bounds", low, high, flush=True)
print("fits", high, flush=True)
"""


def _child(code: str, *args: str) -> str:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600
    )
    return done.stdout + done.stderr


def tflm_arena_bytes(model: bytes) -> int:
    """The smallest tensor arena (bytes, to 16) TFLite Micro runs this model in.

    Its RecordingMicroAllocator reports the arena it used after planning (head + tail) but not
    the scratch that kernels' Prepare borrows on the way, so the search starts there and grows.
    Both run in a child process: the report stays buffered inside the library until the process
    ends, and an arena below that total can crash TFLite Micro."""
    import re

    with tempfile.TemporaryDirectory(prefix="edgequant-tflm-") as tmpdir:
        file = Path(tmpdir) / "model.tflite"
        file.write_bytes(model)
        report = _child(_ARENA_SEARCH, str(file))
        found = re.search(r"Arena allocation total (\d+) bytes", report)
        if found is None:
            raise ExportError(f"TFLite Micro could not allocate the model: {report[-500:]}")
        low, high = int(found.group(1)), 0
        for _ in range(32):  # each crash moves the lower bound up
            report = _child(_ARENA_REFINE, str(file), str(low), str(high))
            refined = re.search(r"fits (\d+)", report)
            if refined is not None:
                return int(refined.group(1))
            bounds = re.findall(r"bounds (\d+) (\d+)", report)
            if bounds:
                low, high = int(bounds[-1][0]), int(bounds[-1][1])
            tried = re.findall(r"try (\d+)", report)
            if not tried:
                break
            low = max(low, int(tried[-1]))  # TFLite Micro aborted on this arena: too small
    raise ExportError("TFLite Micro found no arena size that runs the model")


def tensor_ops(model: bytes) -> tuple[list[str], list[str]]:
    """(op names in execution order, 'OP (tensor)' for every op that reads or writes a float
    tensor): the second list is empty for a fully integer model."""
    it = litert_interpreter(model)
    details = {d["index"]: d for d in it.get_tensor_details()}
    names, floats = [], []
    for op in it._get_ops_details():
        names.append(op["op_name"])
        for t in list(op["inputs"]) + list(op["outputs"]):
            d = details.get(int(t))
            if d is not None and np.issubdtype(d["dtype"], np.floating):
                floats.append(f"{op['op_name']} ({d['name']})")
                break
    return names, floats


def quantize_input(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """A float input on the model's int8 input grid, as the reference's QuantizeLinear does it
    (float32 division, round half to even)."""
    q = np.rint(x.astype(np.float32) / np.float32(scale)).astype(np.int64) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize_output(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


class TFLiteRunner:
    """Runs a fully integer .tflite sample by sample in one runtime: "tflite-micro",
    "litert-ref" (BUILTIN_REF kernels) or "litert" (the default XNNPACK path)."""

    def __init__(self, model: bytes, runtime: str, arena_bytes: int | None = None) -> None:
        self.runtime = runtime
        probe = litert_interpreter(model)
        self.inputs = [
            (d["index"], d["dtype"], *d["quantization"]) for d in probe.get_input_details()
        ]
        self.outputs = [
            (d["index"], d["dtype"], *d["quantization"]) for d in probe.get_output_details()
        ]
        if runtime == "tflite-micro":
            self.tflm = tflm_interpreter(model, arena_bytes)
        elif runtime in ("litert-ref", "litert"):
            self.it = probe if runtime == "litert-ref" else litert_interpreter(model, False)
        else:
            raise ValueError(f"unknown runtime {runtime!r}")

    def run_int(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Integer outputs for one sample (float inputs, batch dimension 1)."""
        feeds = []
        for x, (_, dtype, scale, zp) in zip(xs, self.inputs, strict=True):
            feeds.append(quantize_input(x, scale, zp) if dtype == np.int8 else x.astype(dtype))
        if self.runtime == "tflite-micro":
            for i, f in enumerate(feeds):
                self.tflm.set_input(f, i)
            self.tflm.invoke()
            return [self.tflm.get_output(i).copy() for i in range(len(self.outputs))]
        for f, (index, *_) in zip(feeds, self.inputs, strict=True):
            self.it.set_tensor(index, f)
        self.it.invoke()
        return [self.it.get_tensor(index).copy() for index, *_ in self.outputs]

    def run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Dequantized float outputs for a batch of samples."""
        n = xs[0].shape[0]
        per_sample = [self.run_int([x[i : i + 1] for x in xs]) for i in range(n)]
        outs = []
        for k, (_, dtype, scale, zp) in enumerate(self.outputs):
            q = np.concatenate([p[k] for p in per_sample], axis=0)
            outs.append(dequantize_output(q, scale, zp) if dtype == np.int8 else q)
        return outs


def float_io(model: bytes) -> bytes:
    """The same model with float32 input and output: a QUANTIZE before each int8 input and a
    DEQUANTIZE after each int8 output (the grids stay in the file, on those two ops), written
    with the TFLite schema's object API that ai_edge_litert ships."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(model, 0)
    graph = m.subgraphs[0]

    def opcode(builtin: int) -> int:
        for i, code in enumerate(m.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, builtin, 1
        m.operatorCodes.append(code)
        return len(m.operatorCodes) - 1

    def float_twin(index: int) -> int:
        t = graph.tensors[index]
        twin = schema.TensorT()
        twin.shape = list(t.shape)
        if t.shapeSignature is not None:
            twin.shapeSignature = list(t.shapeSignature)
        twin.type = schema.TensorType.FLOAT32
        m.buffers.append(schema.BufferT())
        twin.buffer = len(m.buffers) - 1
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        twin.name = f"{name}_float"
        graph.tensors.append(twin)
        return len(graph.tensors) - 1

    def op(code: int, inputs: list[int], outputs: list[int]) -> Any:
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, inputs, outputs
        return o

    quantize = opcode(schema.BuiltinOperator.QUANTIZE)
    dequantize = opcode(schema.BuiltinOperator.DEQUANTIZE)
    inputs, outputs = [int(i) for i in graph.inputs], [int(i) for i in graph.outputs]
    twins = {i: float_twin(i) for i in inputs + outputs}
    front = [op(quantize, [twins[i]], [i]) for i in inputs]
    back = [op(dequantize, [i], [twins[i]]) for i in outputs]
    graph.operators = front + list(graph.operators) + back
    graph.inputs = [twins[i] for i in inputs]
    graph.outputs = [twins[i] for i in outputs]
    for signature in m.signatureDefs or []:
        for entry in list(signature.inputs or []) + list(signature.outputs or []):
            entry.tensorIndex = twins.get(entry.tensorIndex, entry.tensorIndex)
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
