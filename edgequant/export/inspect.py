"""What an ONNX model really stores: per weight layer, the weight's dtype, bits and granularity.

Works on the ONNX graph alone (no ONNX Runtime): for every Conv/Gemm/MatMul-like node it follows
the weight input back through layout ops (Transpose, Reshape, Cast, ...) to the initializer that
holds it, and the activation input back to a DequantizeLinear, if any.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, external_data_helper

from edgequant.export.int8_kernels import u8s8_saturates_here
from edgequant.export.weight_trace import (
    LayerInfo,
    OnnxGraph,
    dtype_bits,
    dtype_name,
    inspect_node,
)

__all__ = ["InspectReport", "LayerInfo", "file_size_bytes", "inspect_onnx", "load_onnx_model"]


def load_onnx_model(
    path: str | os.PathLike[str], *, load_external_data: bool = True
) -> onnx.ModelProto:
    """Load an ONNX model, raising FileNotFoundError or ValueError (naming the file) for user errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not an ONNX model: it is not a file")
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except Exception as error:  # protobuf's DecodeError and friends carry no common base class
        raise ValueError(f"{path} is not an ONNX model: {error}") from error
    # An empty or foreign protobuf can parse as an empty ModelProto.
    if model.ir_version == 0 or not model.opset_import:
        raise ValueError(f"{path} is not an ONNX model: no IR version or opset")
    return model


@dataclass
class InspectReport:
    """What `inspect_onnx` found; `format()` prints it, `to_dict()` serializes it."""

    path: str
    file_size_bytes: int
    initializer_bytes: dict[str, int]  # packed data bytes per dtype (INT4: 2 values per byte)
    initializer_count: dict[str, int]
    opset: int
    layers: list[LayerInfo] = field(default_factory=list)
    # The file's own notes (metadata keys "edgequant.*"), e.g. which CPUs run its INT8 weights
    # exactly (export_onnx(weight_storage="auto")).
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def n_quantized(self) -> int:
        return sum(layer.quantized for layer in self.layers)

    @property
    def n_float(self) -> int:
        return sum(layer.has_weight and not layer.quantized for layer in self.layers)

    @property
    def n_without_weight(self) -> int:
        return sum(not layer.has_weight for layer in self.layers)

    @property
    def is_integer(self) -> bool:
        """True when every weight layer's weight is stored as an integer initializer.

        False for a model with no weight layer at all: nothing in it is quantized.
        """
        weighted = [layer for layer in self.layers if layer.has_weight]
        return bool(weighted) and all(layer.weight_source == "integer" for layer in weighted)

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            entry = asdict(layer)
            for key in ("weight_shape", "scale_shape"):
                if entry[key] is not None:
                    entry[key] = list(entry[key])
            entry["quantized"] = layer.quantized
            entry["kernel"] = layer.kernel
            layers.append(entry)
        return {
            "path": self.path,
            "file_size_bytes": self.file_size_bytes,
            "opset": self.opset,
            "initializer_bytes": dict(self.initializer_bytes),
            "initializer_count": dict(self.initializer_count),
            "n_layers": len(self.layers),
            "n_quantized": self.n_quantized,
            "n_float": self.n_float,
            "n_without_weight": self.n_without_weight,
            "is_integer": self.is_integer,
            "notes": dict(self.notes),
            "layers": layers,
        }

    def format(self) -> str:
        """A readable table: one row per weight layer, then totals."""
        header = (
            "layer",
            "op",
            "weight",
            "bits",
            "granularity",
            "scale",
            "zp",
            "activation",
            "kernel",
        )
        rows = [header]
        for layer in self.layers:
            if layer.weight_source == "none":
                # A matmul of two activations: its second operand in the weight's column.
                weight = f"({layer.other_activation})" if layer.other_activation else "-"
            elif layer.weight_source == "fake-quant":
                weight = f"{layer.weight_dtype} (fake-quant)"  # bits: what is simulated
            else:
                weight = layer.weight_dtype or "?"
            if layer.zero_point_zero is None:
                zero_point = ""
            else:
                zero_point = "0" if layer.zero_point_zero else "nonzero"
            activation = layer.activation
            if layer.activation_dtype:
                activation += f" {layer.activation_dtype}"
            rows.append(
                (
                    layer.name,
                    layer.op,
                    weight,
                    "" if layer.weight_bits is None else str(layer.weight_bits),
                    layer.granularity or "",
                    "" if layer.scale_shape is None else _shape_str(layer.scale_shape),
                    zero_point,
                    activation,
                    layer.kernel,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"{self.path}  (opset {self.opset})"]
        for i, row in enumerate(rows):
            lines.append(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
            if i == 0:
                lines.append("  ".join("-" * width for width in widths))
        lines.append("")
        lines.append(f"file size:     {_human_bytes(self.file_size_bytes)}")
        by_dtype = ", ".join(
            f"{name} {_human_bytes(size)} ({self.initializer_count[name]})"
            for name, size in sorted(self.initializer_bytes.items(), key=lambda item: -item[1])
        )
        lines.append(f"initializers:  {by_dtype or 'none'}")
        counts = f"{self.n_quantized} quantized, {self.n_float} float"
        if self.n_without_weight:
            counts += f", {self.n_without_weight} without a constant weight"
        lines.append(f"weight layers: {counts}")
        pairs = [layer for layer in self.layers if layer.other_activation is not None]
        if pairs:
            both = sum(
                layer.activation != "float" and not str(layer.other_activation).startswith("float")
                for layer in pairs
            )
            lines.append(
                f"matmuls of two activations: {len(pairs)}, {both} with both operands quantized"
            )
        lines.append(f"integer:       {'yes' if self.is_integer else 'no'}")
        return "\n".join(lines + self._note_lines())

    def _note_lines(self) -> list[str]:
        """The file's own notes, and the layers whose u8s8 kernels saturate on this CPU."""
        lines = [f"note:          {text}" for text in self.notes.values()]
        saturating = sum("saturates" in layer.kernel for layer in self.layers)
        if saturating and u8s8_saturates_here():
            lines.append(
                f"this CPU:      x86 without VNNI: the u8s8 kernels of {saturating} layers "
                "saturate here, so ONNX Runtime computes them inexactly; export with "
                "weight_storage='exact' for this CPU"
            )
        return lines


def inspect_onnx(path: str | os.PathLike[str]) -> InspectReport:
    """Report, per weight layer of an ONNX model, how its weight and activation are stored."""
    path = os.fspath(path)
    model = load_onnx_model(path, load_external_data=False)
    # Sized before loading: loading external data forgets where it came from.
    size_bytes = file_size_bytes(path, model)
    external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    graph = OnnxGraph(model)
    layers = [inspect_node(graph, index, node) for index, node in graph.weight_nodes()]
    initializer_bytes: dict[str, int] = {}
    initializer_count: dict[str, int] = {}
    for tensor in graph.constants.values():
        name = dtype_name(tensor.data_type)
        initializer_bytes[name] = initializer_bytes.get(name, 0) + _data_bytes(tensor)
        initializer_count[name] = initializer_count.get(name, 0) + 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return InspectReport(
        path=path,
        file_size_bytes=size_bytes,
        initializer_bytes=initializer_bytes,
        initializer_count=initializer_count,
        opset=opset,
        layers=layers,
        notes={p.key: p.value for p in model.metadata_props if p.key.startswith("edgequant.")},
    )


def _data_bytes(tensor: TensorProto) -> int:
    """Bytes of the tensor's data as packed in raw form (INT4: two values per byte)."""
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    numel = math.prod(tensor.dims)
    return math.ceil(numel * dtype_bits(tensor.data_type) / 8)


def file_size_bytes(path: str | os.PathLike[str], model: onnx.ModelProto | None = None) -> int:
    """Bytes of an ONNX file plus the external-data files it refers to.

    `model`, when given, is the file's ModelProto loaded without its external data.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if model is None:
        model = load_onnx_model(path, load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    base = os.path.dirname(os.path.abspath(path))
    for location in locations:
        external = os.path.join(base, location)
        if os.path.isfile(external):
            size += os.path.getsize(external)
    return size


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


MATMUL_OPS = ("MatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "FusedMatMul")


def runtime_activation_matmuls(path: str | os.PathLike[str]) -> dict[str, int]:
    """The op ONNX Runtime (CPU, all graph optimizations) actually runs for each matmul of two
    activations (no constant operand: attention's Q·Kᵀ and P·V), counted by op type: a float
    "MatMul" or "FusedMatMul" there is a matmul left in float."""
    import tempfile

    import onnxruntime as ort

    load_onnx_model(path, load_external_data=False)  # a clear error for a missing or bad file
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    # QLinearMatMul's operands are inputs 0 and 3 (scales and zero points between them).
    operands = {"QLinearMatMul": (0, 3)}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in MATMUL_OPS:
            continue
        a, b = operands.get(node.op_type, (0, 1))
        if node.input[a] in constants or node.input[b] in constants:
            continue
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
