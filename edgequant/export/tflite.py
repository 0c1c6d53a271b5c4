"""Export a quantized model as a fully integer `.tflite` (LiteRT, TFLite Micro), verified bit for
bit in TFLite Micro and LiteRT's reference kernels against the integer reference.

Route: the PT2E form of the model on edgequant's own grids (export/pt2e.py) -> litert-torch's
converter in static quantization mode (without its quant_config it silently writes a float
model with quantize/dequantize pairs) -> a `.tflite` whose every op is int8 (INT32 biases), int8
input and output with their scale and zero point in the file. Verification runs the file in
TFLite Micro (its Python interpreter: the kernels a microcontroller runs, CMSIS-NN's reference)
and in LiteRT with BUILTIN_REF kernels, and compares every output integer with `run_integer` on
the same model's ONNX export: TFLite's integer arithmetic (fixed-point multipliers with
TFLite's default double rounding, int8 ADD with a 20-bit left shift, INT32 biases). Only a file
whose TFLite Micro outputs equal the reference on every sample (and whose LiteRT reference
outputs are within one step: its FULLY_CONNECTED rescales differently) is moved into place;
otherwise the first tensor that differs is named.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgequant._io import atomic_path
from edgequant.batches import batch_list, check_batch_values, run_checked, split_inputs
from edgequant.check.ops import BILINEAR_WHY
from edgequant.export.lower import ExportError
from edgequant.export.onnx import export_onnx
from edgequant.export.pt2e import export_program, pt2e_model, unsupported_nodes
from edgequant.export.tflite_float import not_fully_integer
from edgequant.export.tflite_runtime import (
    TFLiteRunner,
    convert_program,
    dequantize_output,
    float_io,
    litert_interpreter,
    quantize_input,
    tensor_ops,
    tflm_arena_bytes,
)
from edgequant.instrument import quant_layers
from edgequant.quantizer import TensorQuantizer

# The ATen ops of a PT2E graph that litert-torch turns into int8 TFLite builtins, and that TFLite
# Micro runs: conv 1-D/2-D (depthwise included), fully connected, residual add, concatenation,
# average / max pooling, mean, reshapes, transposes, slices, padding, ReLU / ReLU6, nearest
# upsampling (RESIZE_NEAREST_NEIGHBOR: every output value is an input value, on the same grid).
TFLITE_OPS = frozenset(
    {
        "aten.conv1d",
        "aten.conv2d",
        "aten.linear",
        "aten.add",
        "aten.relu",
        "aten.relu_",
        "aten.relu6",
        "aten.hardtanh",
        "aten.clamp",
        "aten.cat",
        "aten.concat",
        "aten.max_pool1d",
        "aten.max_pool2d",
        "aten.avg_pool1d",
        "aten.avg_pool2d",
        "aten.adaptive_avg_pool1d",
        "aten.adaptive_avg_pool2d",
        "aten.mean",
        "aten.upsample_nearest2d",
        "aten.view",
        "aten.reshape",
        "aten.flatten",
        "aten.permute",
        "aten.transpose",
        "aten.squeeze",
        "aten.unsqueeze",
        "aten.contiguous",
        "aten.slice",
        "aten.pad",
        "aten.constant_pad_nd",
        "aten.sym_size",
        "aten.index_select",
        "getitem",
        "quantized_decomposed.quantize_per_tensor",
        "quantized_decomposed.dequantize_per_tensor",
        "quantized_decomposed.quantize_per_channel",
        "quantized_decomposed.dequantize_per_channel",
    }
)
LITERT_REFERENCE_MAX_STEPS = 1
IO_TYPES = ("int8", "float")
ROUNDING = "double"  # TFLite's and TFLite Micro's default builds (no TFLITE_SINGLE_ROUNDING)


@dataclass
class EdgeVerification:
    """The file run in its runtime(s) against the reference, sample by sample."""

    runtimes: list[str] = field(default_factory=list)
    reference: str = ""
    samples: int = 0
    # TFLite Micro: the share of output integers equal to the reference's (must be 1), and the
    # largest |runtime - reference| in output steps.
    bit_exact: float = 0.0
    max_step_difference: int = 0
    # LiteRT's reference kernels: the same two figures. Its FULLY_CONNECTED rescales its int32
    # sums otherwise than TFLite Micro's (on ResNet-20 a few logits in a thousand land one step
    # apart), so it must stay within LITERT_REFERENCE_MAX_STEPS, not be bit-exact.
    litert_reference_bit_exact: float | None = None
    litert_reference_max_step_difference: int | None = None
    top1_agreement: float | None = None  # with the simulation (the fake-quantized model)
    sqnr_db: float | None = None  # executorch: runtime output vs the simulation
    first_difference: str = ""
    passed: bool = False
    reason: str = ""

    def conclude(self, problems: list[str], file_kind: str) -> None:
        """Record the verdict; ExportError naming every problem where there is one (the caller
        has written nothing yet)."""
        self.passed = not problems
        self.reason = "; ".join(problems)
        if not self.passed:
            raise ExportError(
                f"the {file_kind} does not compute what the simulation computes: {self.reason}; "
                "nothing was written"
            )


@dataclass
class EdgeExportInfo:
    path: str
    format: str
    size_bytes: int  # the file: flash on a microcontroller
    float_params_bytes: int
    size_ratio: float
    quantized_layers: int
    arena_bytes: int | None = None  # TFLite Micro's smallest tensor arena for the file (RAM)
    input_quantization: list[tuple[float, int]] = field(default_factory=list)
    output_quantization: list[tuple[float, int]] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    verification: EdgeVerification = field(default_factory=EdgeVerification)
    wall_s: float = 0.0

    @classmethod
    def of_file(
        cls, qmodel: nn.Module, path: Path, format: str, data: bytes, **fields: Any
    ) -> EdgeExportInfo:
        """The record of `data` written at `path` for qmodel: its size against qmodel's float
        parameters, and `fields` (ops, verification, ...)."""
        float_bytes = sum(4 * p.numel() for p in qmodel.parameters())
        return cls(
            path=str(path),
            format=format,
            size_bytes=len(data),
            float_params_bytes=float_bytes,
            size_ratio=len(data) / max(float_bytes, 1),
            quantized_layers=len(list(quant_layers(qmodel))),
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        v = self.verification
        arena = f", TFLite Micro arena {self.arena_bytes} bytes" if self.arena_bytes else ""
        agree = f", top-1 agreement {v.top1_agreement:.4f}" if v.top1_agreement is not None else ""
        match = (
            f"SQNR {v.sqnr_db:.1f} dB"
            if v.sqnr_db is not None
            else f"{v.bit_exact:.4f} of TFLite Micro's outputs bit-exact"
        )
        return (
            f"wrote {self.path}: {self.size_bytes} bytes ({self.size_ratio:.3f}x the float "
            f"parameters){arena}; verified in {' and '.join(v.runtimes)} on {v.samples} samples "
            f"against {v.reference}: {match}{agree}"
        )


# --- verification ---------------------------------------------------------------------------


def _as_arrays(batch: Any) -> list[np.ndarray]:
    args, kwargs = split_inputs(batch)
    if kwargs:
        raise ValueError("TFLite export takes positional tensor inputs, not a dict")
    return [a.detach().cpu().float().numpy() for a in args]


def _output_integers(ref: list[np.ndarray], quant: list[tuple[Any, ...]]) -> list[np.ndarray]:
    """The reference's dequantized outputs back on the file's output grids (exact: they are
    integers times the same float32 scale)."""
    out = []
    for r, (_, _, scale, zp) in zip(ref, quant, strict=True):
        out.append(np.rint(r / np.float32(scale)).astype(np.int64) + zp)
    return out


def first_difference(model: bytes, onnx_path: Path, sample: list[np.ndarray]) -> str:
    """The first tensor, in TFLite execution order, where LiteRT's reference kernels (which
    TFLite Micro matches bit for bit) differ from the integer reference on one sample: tensors
    are matched by grid (scale, zero point) and shape, NHWC read as NCHW."""
    import onnx

    from edgequant.export.integer import IntegerRunner
    from edgequant.export.integer_values import Quantized

    it = litert_interpreter(model, keep_all=True)
    inputs = it.get_input_details()
    for x, d in zip(sample, inputs, strict=True):
        it.set_tensor(d["index"], quantize_input(x, *d["quantization"]))
    it.invoke()
    runner = IntegerRunner(onnx.load(str(onnx_path)), "float64", ROUNDING)
    trace: dict[str, Any] = {}
    runner.run(dict(zip(runner.input_names, sample, strict=True)), trace)
    by_grid: dict[tuple[float, int], list[tuple[str, np.ndarray]]] = {}
    for name, v in trace.items():
        if isinstance(v, Quantized) and v.per_tensor:
            key = (float(np.float32(np.asarray(v.scale).reshape(-1)[0])), int(v.zp.reshape(())))
            by_grid.setdefault(key, []).append((name, v.q))
    details = {d["index"]: d for d in it.get_tensor_details()}
    for op in it._get_ops_details():
        for t in op["outputs"]:
            d = details[int(t)]
            scale, zp = d["quantization"]
            if d["dtype"] != np.int8 or scale == 0:
                continue
            got = it.get_tensor(d["index"]).astype(np.int64)
            layouts = [got] + ([got.transpose(0, 3, 1, 2)] if got.ndim == 4 else [])
            grid = by_grid.get((float(np.float32(scale)), int(zp)), [])
            matched = [
                (name, int(np.abs(q - layout).max()))
                for layout in layouts
                for name, q in grid
                if q.shape == layout.shape
            ]
            if matched and all(diff for _, diff in matched):
                name, diff = min(matched, key=lambda m: m[1])
                return (
                    f"op {op['op_name']} writing {d['name']!r} differs from the reference's "
                    f"{name!r} by up to {diff} steps"
                )
    return "no single intermediate tensor could be matched to the reference"


# --- the entry point ------------------------------------------------------------------------


def check_edge_args(
    qmodel: Any, path: Any, example_inputs: Any, verify_data: Any, suffix: str
) -> tuple[Path, list[Any]]:
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    if not list(quant_layers(qmodel)):
        raise ValueError(
            "qmodel has no quantized layer: run edgequant.quantize (or prepare_qat) first"
        )
    modes = [q.mode for q in qmodel.modules() if isinstance(q, TensorQuantizer)]
    if "observe" in modes or not any(m == "quantize" for m in modes):
        raise ValueError(
            "qmodel is not calibrated (quantizers observing, or none active): quantize it with "
            "edgequant.quantize first"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"path must end in {suffix}, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory")
    if not path.parent.is_dir():
        raise ValueError(f"the folder {str(path.parent)!r} does not exist")
    args, kwargs = split_inputs(example_inputs)
    if kwargs or not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError(
            "example_inputs must be a tensor or a tuple of tensors (edge runtimes take "
            f"positional tensor inputs), got {type(example_inputs).__name__}"
        )
    for i, a in enumerate(args):
        if not a.is_floating_point() or a.dtype != torch.float32:
            raise TypeError(f"example_inputs[{i}] must be float32, got {a.dtype}")
    check_batch_values(example_inputs, "example_inputs")
    verify = batch_list(verify_data, "verify_data") if verify_data is not None else []
    for i, batch in enumerate(verify):
        check_batch_values(batch, f"verify_data[{i}]")
    return path, verify


def _target(qmodel: nn.Module) -> str:
    summary = getattr(qmodel, "quant_summary", None)
    return str(getattr(summary, "target", "") or "")


def _top1(ref: np.ndarray, test: np.ndarray) -> tuple[int, int] | None:
    if ref.ndim != 2 or ref.shape[1] < 2:
        return None
    return int((ref.argmax(1) == test.argmax(1)).sum()), ref.shape[0]


def export_tflite(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    verify_data: Iterable[Any] | None = None,
    io: str = "int8",
) -> EdgeExportInfo:
    """Write qmodel as a fully integer .tflite at `path` (int8 input and output, their scale and
    zero point in the file, as microcontroller code expects; io="float": float32 input and
    output through a QUANTIZE and a DEQUANTIZE op; batch size 1, the shape of example_inputs'
    first sample), after
    proving in TFLite Micro and LiteRT's reference kernels that every output integer equals the
    integer reference's (TFLite's arithmetic on the simulation's grids) on example_inputs and
    verify_data.

    The model must be quantized for a fully integer target (`mcu-int8`: every activation edge
    on an int8 grid); ops TFLite has no integer kernel for are refused before any work, with the
    op and layer named. Nothing is written unless verification passes (ExportError).
    """
    from edgequant.targets import TARGETS

    path, verify = check_edge_args(qmodel, path, example_inputs, verify_data, ".tflite")
    if io not in IO_TYPES:
        raise ValueError(f"io must be one of {', '.join(map(repr, IO_TYPES))}, got {io!r}")
    target = _target(qmodel)
    training = {m: m.training for m in qmodel.modules()}
    try:
        qmodel.eval()
        run_checked(qmodel, example_inputs, "example_inputs")
        if target not in TARGETS or not TARGETS[target].fully_integer:
            args, _ = split_inputs(example_inputs)
            raise ExportError(not_fully_integer(qmodel, target, tuple(a[:1] for a in args)))
        return _export_tflite(qmodel, path, example_inputs, verify, io)
    finally:
        for m, flag in training.items():
            m.training = flag


def _export_tflite(
    qmodel: nn.Module, path: Path, example_inputs: Any, verify: list[Any], io: str
) -> EdgeExportInfo:
    start = time.perf_counter()
    args, _ = split_inputs(example_inputs)
    integer_model = _convert(qmodel, tuple(a[:1] for a in args))
    flatbuffer = integer_model
    grids = TFLiteRunner(integer_model, "litert-ref")  # the int8 input and output grids
    if io == "float":
        flatbuffer = float_io(integer_model)
    ops = tensor_ops(flatbuffer)[0]
    v = EdgeVerification(
        runtimes=["TFLite Micro", "LiteRT (reference kernels)"],
        reference=f"the integer reference (TFLite arithmetic, {ROUNDING} rounding)",
    )
    with tempfile.TemporaryDirectory(prefix="edgequant-tflite-") as tmpdir:
        reference_onnx = Path(tmpdir) / "reference.onnx"
        export_onnx(qmodel, reference_onnx, example_inputs)
        arena = tflm_arena_bytes(flatbuffer)
        runners = [
            TFLiteRunner(flatbuffer, "tflite-micro", arena),
            TFLiteRunner(flatbuffer, "litert-ref"),
        ]
        comparison = _Tally(v, runners, grids, integer_model, reference_onnx)
        for batch in [example_inputs] + verify:
            comparison.add(qmodel, batch)
        comparison.conclude()
        with atomic_path(path, suffix=".tflite.tmp") as tmp:
            tmp.write_bytes(flatbuffer)
    return EdgeExportInfo.of_file(
        qmodel,
        path,
        "tflite",
        flatbuffer,
        arena_bytes=arena,
        input_quantization=[(float(s), int(z)) for *_, s, z in grids.inputs],
        output_quantization=[(float(s), int(z)) for *_, s, z in grids.outputs],
        ops=ops,
        verification=v,
        wall_s=time.perf_counter() - start,
    )


def _convert(qmodel: nn.Module, one: tuple[Tensor, ...]) -> bytes:
    """The fully integer .tflite bytes of qmodel (ExportError naming the ops that are not)."""
    model = pt2e_model(qmodel)
    program = export_program(model, one)
    bad = unsupported_nodes(program, TFLITE_OPS)
    if bad:
        bilinear = any(b.startswith("aten.upsample_bilinear2d") for b in bad)
        raise ExportError(
            f"{len(bad)} ops have no integer TFLite kernel here: "
            + "; ".join(bad[:5])
            + (f" (bilinear upsampling: {BILINEAR_WHY})" if bilinear else "")
        )
    flatbuffer = convert_program(program, one)
    _, floats = tensor_ops(flatbuffer)
    if floats:
        raise ExportError(
            f"the converted model is not fully integer ({len(floats)} ops read or write float "
            "tensors): " + "; ".join(floats[:5])
        )
    return flatbuffer


class _Tally:
    """Output integers of each runtime against the integer reference, batch by batch, and the
    simulation's top-1 agreement with TFLite Micro's outputs."""

    def __init__(
        self,
        v: EdgeVerification,
        runners: list[TFLiteRunner],
        grids: TFLiteRunner,
        integer_model: bytes,
        reference_onnx: Path,
    ) -> None:
        self.v, self.runners, self.grids = v, runners, grids
        self.integer_model, self.reference_onnx = integer_model, reference_onnx
        # Per runtime: [equal output integers, all output integers, largest step difference].
        self.counts = {r.runtime: [0, 0, 0] for r in runners}
        self.agree = self.counted = 0

    def add(self, qmodel: nn.Module, batch: Any) -> None:
        from edgequant.export.integer import run_integer

        xs = _as_arrays(batch)
        n = xs[0].shape[0]
        ref = run_integer(self.reference_onnx, xs, rounding=ROUNDING)
        ref_int = _output_integers(ref if isinstance(ref, list) else [ref], self.grids.outputs)
        with torch.no_grad():
            sim = qmodel(*[torch.from_numpy(x) for x in xs])
        sim_list = [sim] if isinstance(sim, Tensor) else list(sim)
        for runner in self.runners:
            per_sample = [runner.run_int([x[i : i + 1] for x in xs]) for i in range(n)]
            first = runner is self.runners[0]
            for k, r in enumerate(ref_int):
                got = np.concatenate([p[k] for p in per_sample], axis=0)
                _, _, scale, zp = self.grids.outputs[k]
                if np.issubdtype(got.dtype, np.floating):  # io="float": DEQUANTIZE's output
                    got = np.rint(got / np.float32(scale)) + zp
                got = got.astype(np.int64)
                self._count(runner.runtime, got, r, xs if first else None)
                if first:
                    top = _top1(sim_list[k].float().numpy(), dequantize_output(got, scale, zp))
                    if top is not None:
                        self.agree += top[0]
                        self.counted += top[1]
        self.v.samples += n

    def _count(self, runtime: str, got: np.ndarray, ref: np.ndarray, xs: Any) -> None:
        """Tally one output; for the first runtime (xs given), locate the first difference."""
        counts = self.counts[runtime]
        diff = np.abs(got - ref)
        counts[0] += int((diff == 0).sum())
        counts[1] += diff.size
        counts[2] = max(counts[2], int(diff.max()))
        if diff.any() and xs is not None and not self.v.first_difference:
            n = xs[0].shape[0]
            bad_sample = int(np.nonzero(diff.reshape(n, -1).any(1))[0][0])
            self.v.first_difference = first_difference(
                self.integer_model,
                self.reference_onnx,
                [x[bad_sample : bad_sample + 1] for x in xs],
            )

    def conclude(self) -> None:
        """Record the figures in the verification, and refuse (ExportError) a file that differs."""
        v = self.v
        equal, total, max_diff = self.counts["tflite-micro"]
        v.bit_exact = equal / max(total, 1)
        v.max_step_difference = max_diff
        v.top1_agreement = self.agree / self.counted if self.counted else None
        ref_equal, ref_total, ref_max = self.counts["litert-ref"]
        v.litert_reference_bit_exact = ref_equal / max(ref_total, 1)
        v.litert_reference_max_step_difference = ref_max
        problems = []
        if equal != total:
            problems.append(
                f"in TFLite Micro {total - equal} of {total} output integers differ from the "
                f"integer reference (up to {max_diff} steps); first: {v.first_difference}"
            )
        if ref_max > LITERT_REFERENCE_MAX_STEPS:
            problems.append(
                f"in LiteRT's reference kernels outputs differ by up to {ref_max} steps "
                f"(allowed: {LITERT_REFERENCE_MAX_STEPS})"
            )
        v.conclude(problems, ".tflite")
