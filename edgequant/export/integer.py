"""The integer-only reference: what a microcontroller port of an exported `mcu-int8` model must
compute, bit for bit.

`run_integer(onnx_path, inputs)` executes a fully integer QDQ graph (every compute node reads
DequantizeLinear outputs and feeds a QuantizeLinear) with integer arithmetic only, as TFLite's
reference kernels and CMSIS-NN do:

- int8 (or uint8) activations and weights, INT32 bias, products summed into an INT32
  accumulator (an overflow is an error, never a wrap);
- requantization by a 31-bit fixed-point multiplier and a shift (TFLite's
  MultiplyByQuantizedMultiplier), the multiplier from the double-precision real scale (input
  scale x weight scale / output scale, per output channel). Two roundings, both TFLite's and
  CMSIS-NN's: "single" (the default; TFLITE_SINGLE_ROUNDING / CMSIS_NN_USE_SINGLE_ROUNDING: the
  64-bit product rounded once, ties up) and "double" (their default builds: gemmlowp's
  SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT);
- additions as TFLite's int8 ADD: both inputs shifted left by 20 bits, each rescaled to twice
  the larger input scale by its own multiplier, summed, rescaled to the output;
- average pooling: the INT32 sum of the window, then the output requantization with the
  multiplier input scale / (output scale x window size) (with equal input and output grids,
  TFLite's AveragePool: divide by the window size, rounding half away from zero); max pooling,
  reshapes, slices and zero padding (the zero point) on the integers themselves;
- ReLU / ReLU6 / Clip after a compute node: the clamp of the requantization.

Only the model's input (float) is quantized with QuantizeLinear's float division, and only the
outputs are dequantized: everything between is integers.

Where it can differ from ONNX Runtime: ORT runs the same QDQ graph with float requantization
(QLinearConv: the INT32 accumulator times a float32 scale, rounded half to even; or float
kernels between DequantizeLinear and QuantizeLinear). So a value can land one step apart
(1) at an exact tie (x.5): ORT rounds to even, "single" up, "double" away from zero; (2) within
about 2^-24 of a tie, where ORT's float32 scale is off and the 31-bit multiplier is not; and,
with "double" only, (3) within 2^-(right shift + 1) of a tie, where the first of the two
roundings decides (on ResNet-20 that is ~0.1 % of the first conv's outputs, against ~0.001 %
with "single"). A one-step difference in one layer can move later layers' values too. Measured
on the pretrained ResNet-20 mcu-int8 export (benchmarks/results/integer_resnet20.json): top-1
agreement with ORT on test_932 is 100 % with "single" (932/932; 5 % of the logits differ, by
at most 2 steps) and 99.36 % with "double" (6 of 932 differ; 54 % of the logits).

`fully_integer_violations(model)` is the checker for the graph property itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# TFLite's int8 ADD: inputs are shifted left by this many bits before rescaling.
ADD_LEFT_SHIFT = 20

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
# Float constants a node may read besides dequantized tensors: the pad value and clip bounds
# are parameters of an integer kernel (the zero point, the clamp), not data.
_PARAMETER_INPUTS = {"Pad": {2}, "Clip": {1, 2}, "Resize": {1, 2}}  # Resize: roi, scales
# Ops that read only their input's shape, never its values: shape arithmetic, not computation
# (the exporter reads a dynamic batch size with Shape of the graph's float input).
_SHAPE_ONLY_OPS = ("Shape", "Size")


class IntegerGraphError(ValueError):
    """The graph is not one the integer runner executes (names the node and its op type)."""


# --- the graph property ----------------------------------------------------------------------


def _load(model: Any) -> Any:
    import onnx

    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"no such ONNX file: {os.fspath(model)}")
        from edgequant.export.inspect import load_onnx_model

        # A ValueError naming the file for a text file, an empty file or another protobuf.
        return load_onnx_model(model)
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(
            f"expected an ONNX file path or onnx.ModelProto, got {type(model).__name__}"
        )
    return model


def _readers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _float_tensors(model: Any) -> set[str]:
    import onnx
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    inferred = onnx.shape_inference.infer_shapes(model)
    names = set()
    for v in (
        list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    ):
        if v.type.tensor_type.elem_type in floats:
            names.add(v.name)
    for t in model.graph.initializer:
        if t.data_type in floats:
            names.add(t.name)
    return names


def fully_integer_violations(model: Any) -> list[str]:
    """Every way the graph breaks "each compute node reads from a DequantizeLinear and feeds a
    QuantizeLinear" ([] when it is fully integer).

    Compute node: any node but QuantizeLinear, DequantizeLinear and Constant that reads or
    writes a float tensor (shape arithmetic on int64 is not computation on data, and Shape and
    Size read no values, so a float input of theirs is no float edge). Float constants are
    allowed only as Pad's pad value (0) and Clip's bounds.
    """
    model = _load(model)
    graph = model.graph
    floats = _float_tensors(model)
    consts = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    problems = []
    for node in graph.node:
        if node.op_type in (_Q, _DQ, "Constant", *_SHAPE_ONLY_OPS):
            continue
        label = f"node {node.name or node.output[0]!r} ({node.op_type})"
        float_in = [(k, i) for k, i in enumerate(node.input) if i and i in floats]
        float_out = [o for o in node.output if o in floats]
        if not float_in and not float_out:
            continue
        for k, name in float_in:
            src = producer.get(name)
            if src is not None and src.op_type == _DQ:
                continue
            if name in consts and k in _PARAMETER_INPUTS.get(node.op_type, ()):
                if node.op_type == "Pad" and np.any(consts[name] != 0):
                    problems.append(f"{label} pads with the float value {consts[name]}, not 0")
                continue
            origin = (
                f"{src.op_type} {src.name or src.output[0]!r}"
                if src is not None
                else ("a float constant" if name in consts else "the graph input")
            )
            problems.append(f"{label} reads float tensor {name!r} from {origin}")
        for name in float_out:
            users = readers.get(name, [])
            if name in outputs:
                problems.append(f"{label} writes the graph output {name!r} in float")
            bad = [u for u in users if u.op_type != _Q]
            if bad:
                what = ", ".join(f"{u.op_type} {u.name or u.output[0]!r}" for u in bad[:3])
                problems.append(f"{label} feeds {what} with float tensor {name!r}")
    return problems


def merge_slices(model: Any) -> int:
    """Merge a Slice whose only reader is another Slice (on other axes) into that one: the
    exporter writes x[:, :, ::2, ::2] as one Slice per axis, with a float tensor between them.
    Exact; returns how many were merged."""
    from onnx import numpy_helper

    graph = model.graph
    merged = 0
    while True:
        consts = _constants(graph)
        readers = _readers(graph)
        outputs = {o.name for o in graph.output}
        pair = None
        for first in graph.node:
            users = readers.get(first.output[0], []) if first.op_type == "Slice" else []
            if len(users) != 1 or users[0].op_type != "Slice" or first.output[0] in outputs:
                continue
            second = users[0]
            parts = []
            for node in (first, second):
                ins = list(node.input) + [""] * (5 - len(node.input))
                if not all(i in consts for i in ins[1:4]) or (ins[4] and ins[4] not in consts):
                    break
                starts = consts[ins[1]].astype(np.int64).reshape(-1)
                steps = (
                    consts[ins[4]].astype(np.int64).reshape(-1) if ins[4] else np.ones_like(starts)
                )
                parts.append(
                    (starts, consts[ins[2]].reshape(-1), consts[ins[3]].reshape(-1), steps)
                )
            else:
                axes = np.concatenate([p[2] for p in parts]).astype(np.int64)
                if len(set(axes.tolist())) == len(axes) and np.all(axes >= 0):
                    pair = (first, second, parts)
                    break
        if pair is None:
            return merged
        first, second, parts = pair
        names = []
        for k, label in enumerate(("starts", "ends", "axes", "steps")):
            name = f"{second.output[0]}_merged_{label}"
            value = np.concatenate([p[k] for p in parts]).astype(np.int64)
            graph.initializer.append(numpy_helper.from_array(value, name))
            names.append(name)
        del second.input[:]
        second.input.extend([first.input[0]] + names)
        graph.node.remove(first)
        merged += 1


# Ops that only move or regroup values (each output value is one of the input's values).
_VALUE_MOVES = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity")


def quantize_inputs_first(model: Any) -> int:
    """Where a float graph input reaches its QuantizeLinear only through ops that move values
    (a model that flattens or reshapes its input before the first layer), quantize the input
    first: QuantizeLinear/DequantizeLinear with that quantizer's per-tensor scale and zero point
    right after the input, the moves reading its output. Exact (quantization is elementwise, the
    moves keep values, and the QuantizeLinear after them re-quantizes to the same grid); the
    moves then run on integers. Returns how many inputs were rewritten.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    consts = _constants(graph)
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    rewritten = 0
    for value in graph.input:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        moves, quantizers, frontier, ok = [], [], [value.name], True
        while frontier and ok:
            name = frontier.pop()
            ok = name not in outputs
            for reader in readers.get(name, []):
                if reader.op_type in _SHAPE_ONLY_OPS:
                    continue
                if reader.op_type == _Q and reader.input[0] == name:
                    quantizers.append(reader)
                elif reader.op_type in _VALUE_MOVES and reader.input[0] == name:
                    moves.append(reader)
                    frontier.extend(reader.output)
                else:
                    ok = False
        if not ok or not moves or not quantizers:
            continue
        params = {tuple(q.input[1:3]) for q in quantizers}
        if len(params) != 1:
            continue
        scale, zero_point = next(iter(params))
        if scale not in consts or consts[scale].size != 1:
            continue
        q_out, dq_out = f"{value.name}_quantized", f"{value.name}_dequantized"
        first = [
            helper.make_node(_Q, [value.name, scale, zero_point], [q_out], name=f"{q_out}_q"),
            helper.make_node(_DQ, [q_out, scale, zero_point], [dq_out], name=f"{q_out}_dq"),
        ]
        for move in moves:
            if move.input[0] == value.name:
                move.input[0] = dq_out
        nodes = first + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        rewritten += 1
    return rewritten


def fold_activations_into_quantizers(model: Any) -> int:
    """Drop each Relu/Clip whose only reader is a QuantizeLinear whose grid the activation
    cannot change: Q(relu(x)) == Q(x) when the zero point is the grid's lowest level (every
    negative x saturates there anyway); Q(clip(x, a, b)) == Q(x) when a and b quantize to or
    beyond the grid's ends. Exact, so the simulation still verifies; returns how many."""
    graph = model.graph
    consts = _constants(graph)
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    drop = []
    for node in graph.node:
        if node.op_type not in ("Relu", "Clip") or node.output[0] in outputs:
            continue
        users = readers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != _Q:
            continue
        q = users[0]
        if len(q.input) < 3 or q.input[1] not in consts or q.input[2] not in consts:
            continue
        scale = consts[q.input[1]].astype(np.float32)
        zp = consts[q.input[2]]
        if scale.size != 1:
            continue
        lo_level, hi_level = _dtype_range(zp.dtype)
        zp_i = int(zp.reshape(()))
        lo: float | None = 0.0
        hi: float | None = None
        if node.op_type == "Clip":
            bounds = [consts.get(i) if i else None for i in list(node.input[1:3]) + ["", ""]][:2]
            if any(i and i not in consts for i in node.input[1:3]):
                continue
            lo = None if bounds[0] is None else float(bounds[0])
            hi = None if bounds[1] is None else float(bounds[1])

        s = scale.reshape(())
        if lo is not None and int(np.rint(np.float32(lo) / s)) + zp_i > lo_level:
            continue
        if hi is not None and int(np.rint(np.float32(hi) / s)) + zp_i < hi_level:
            continue
        drop.append(node)
    for node in drop:
        for user in readers[node.output[0]]:
            for k, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[k] = node.input[0]
        graph.node.remove(node)
    if drop:  # the Clip bounds nothing reads any more
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
            graph.node.remove(n)
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
    return len(drop)


# --- fixed-point arithmetic (gemmlowp / TFLite) ----------------------------------------------


def quantize_multiplier(real: Any) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's QuantizeMultiplier: real = multiplier * 2^(shift - 31), multiplier a 31-bit
    integer in [2^30, 2^31) (0 for real 0). Element-wise over an array of positive reals."""
    r = np.asarray(real, dtype=np.float64)
    if np.any(~np.isfinite(r)) or np.any(r < 0):
        raise IntegerGraphError(f"requantization multiplier must be finite and >= 0, got {r}")
    mantissa, shift = np.frexp(r)
    # std::round: half away from zero (mantissa > 0 here).
    q = np.floor(mantissa * 2.0**31 + 0.5).astype(np.int64)
    shift = shift.astype(np.int64)
    top = q == 2**31
    q = np.where(top, q // 2, q)
    shift = np.where(top, shift + 1, shift)
    tiny = shift < -31
    q = np.where(tiny | (r == 0), 0, q)
    shift = np.where(tiny | (r == 0), 0, shift)
    big = shift > 30
    q = np.where(big, 2**31 - 1, q)
    shift = np.where(big, 30, shift)
    return q, shift


def _trunc_div_pow2_31(t: np.ndarray) -> np.ndarray:
    """t / 2^31 truncated toward zero, as C++ integer division."""
    d = np.int64(2**31)
    return np.where(t >= 0, t // d, -((-t) // d))


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp's SaturatingRoundingDoublingHighMul on int32 values (held in int64)."""
    a = a.astype(np.int64)
    b = np.asarray(b, dtype=np.int64)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    high = _trunc_div_pow2_31(ab + nudge)
    return np.where(overflow, INT32_MAX, high)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp's RoundingDivideByPOT: x / 2^exponent, ties away from zero."""
    x = x.astype(np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> e) + (remainder > threshold).astype(np.int64)


ROUNDINGS = ("double", "single")


def multiply_by_quantized_multiplier(
    x: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, rounding: str = "double"
) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier: x * multiplier * 2^(shift - 31), rounded; x holds
    int32 values.

    rounding="double": gemmlowp's SaturatingRoundingDoublingHighMul (the 64-bit product
    rounded to its high 32 bits, ties up) then RoundingDivideByPOT (the right shift, ties away
    from zero): TFLite's reference kernels and CMSIS-NN as built by default. Two roundings: the
    first leaves a multiple of 2^-right_shift, so a value within 2^-(right_shift + 1) of a tie
    can round the wrong way (seen on ResNet-20: acc 10402 x 0.0030282 = 31.4998 -> 32).
    rounding="single": one rounding of the 64-bit product, ties toward +infinity: TFLite built
    with TFLITE_SINGLE_ROUNDING, CMSIS-NN with CMSIS_NN_USE_SINGLE_ROUNDING.
    In "double" the left shift saturates to int32 as a 32-bit port's does."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    shift = np.asarray(shift, dtype=np.int64)
    if rounding == "single":
        total = 31 - shift
        product = x.astype(np.int64) * np.asarray(multiplier, dtype=np.int64)
        return (product + (np.int64(1) << (total - 1))) >> total
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = np.clip(x.astype(np.int64) * (np.int64(1) << left), INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)


# --- values while running --------------------------------------------------------------------


def _dtype_range(dtype: Any) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


@dataclass
class _Quantized:
    """Integers with their grid: what a DequantizeLinear output stands for. scale/zp per tensor
    (activations) or per channel along `axis` (weights, biases)."""

    q: np.ndarray  # int64
    scale: np.ndarray  # float32
    zp: np.ndarray  # int64
    axis: int | None
    dtype: Any  # the storage dtype (np.int8, np.uint8, np.int32)

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    def centered(self) -> np.ndarray:
        """q - zero point (per tensor)."""
        return self.q - int(self.zp.reshape(()))

    def like(self, q: np.ndarray) -> _Quantized:
        return _Quantized(q, self.scale, self.zp, self.axis, self.dtype)


@dataclass
class _Pending:
    """A compute node's result before its QuantizeLinear: `finish(scale, zp, lo, hi)` gives
    the output integers on that grid, clamped to [lo, hi] (the type range narrowed by any
    fused activation). clamp: the fused activation's float bounds."""

    finish: Callable[[float, int, int, int], np.ndarray]
    label: str
    clamp_lo: float | None = None
    clamp_hi: float | None = None


def _tflite_round(v: float) -> int:
    return int(np.floor(abs(v) + 0.5) * (1 if v >= 0 else -1))


def _scalar(a: np.ndarray) -> float:
    return float(np.asarray(a).reshape(()))


class _Runner:
    def __init__(self, model: Any, matmul: str, rounding: str = "single") -> None:
        if matmul not in ("float64", "int64"):
            raise ValueError(f"matmul must be 'float64' or 'int64', got {matmul!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.rounding = rounding
        self.model = model
        self.graph = model.graph
        self.matmul = matmul
        self.consts = _constants(self.graph)
        inits = {t.name for t in self.graph.initializer}
        self.input_names = [i.name for i in self.graph.input if i.name not in inits]
        self.output_names = [o.name for o in self.graph.output]
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise IntegerGraphError(
                    f"node {self._name(node)!r} ({node.domain}:{node.op_type}): custom domain "
                    "ops are not supported"
                )

    def mbqm(self, x: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
        return multiply_by_quantized_multiplier(x, mult, shift, self.rounding)

    @staticmethod
    def _name(node: Any) -> str:
        return str(node.name or node.output[0])

    def error(self, node: Any, message: str) -> IntegerGraphError:
        return IntegerGraphError(f"node {self._name(node)!r} ({node.op_type}): {message}")

    # -- attributes and inputs
    @staticmethod
    def attrs(node: Any) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def run(
        self, feeds: dict[str, np.ndarray], trace: dict[str, Any] | None = None
    ) -> list[np.ndarray]:
        """The graph's outputs; `trace`, when given, receives every tensor by name (the
        quantized ones as _Quantized), for locating where another runtime first differs."""
        env: dict[str, Any] = trace if trace is not None else {}
        env.update(self.consts)
        env.update(feeds)
        for node in self.graph.node:
            if node.op_type == "Constant":
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise self.error(node, "no integer kernel for this op type in the runner")
            args = [env.get(i) if i else None for i in node.input]
            for i, a in zip(node.input, args, strict=True):
                if i and a is None:
                    raise self.error(node, f"input {i!r} is not available")
            results = handler(node, args)
            for name, value in zip(node.output, results, strict=False):
                env[name] = value
        outputs = []
        for name in self.output_names:
            v = env[name]
            if isinstance(v, _Quantized):
                outputs.append(_dequantize(v))
            elif isinstance(v, np.ndarray) and not np.issubdtype(v.dtype, np.floating):
                outputs.append(v)
            else:
                raise IntegerGraphError(
                    f"graph output {name!r} is not a DequantizeLinear output: the graph is not "
                    "fully integer"
                )
        return outputs

    # -- quantize / dequantize
    def op_QuantizeLinear(self, node: Any, args: list[Any]) -> list[Any]:
        x, scale, zp = (args + [None, None])[:3]
        if zp is None:
            raise self.error(node, "needs an explicit zero point (its type is the grid's)")
        if np.asarray(scale).size != 1:
            raise self.error(node, "per-axis activation quantization is not supported")
        s = np.float32(_scalar(scale))
        z = int(np.asarray(zp).reshape(()))
        lo, hi = _dtype_range(zp.dtype)
        if isinstance(x, _Pending):
            a, b = lo, hi
            if x.clamp_lo is not None:
                a = max(lo, z + _tflite_round(x.clamp_lo / float(s)))
            if x.clamp_hi is not None:
                b = min(hi, z + _tflite_round(x.clamp_hi / float(s)))
            q = x.finish(float(s), z, a, b)
        elif isinstance(x, _Quantized):
            q = _requantize(x, float(s), z, lo, hi, self.mbqm)
        elif isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            # The model's float input: the one place floats are quantized (as ORT does it).
            q = np.clip(np.rint(x.astype(np.float32) / s).astype(np.int64) + z, lo, hi)
        else:
            raise self.error(node, f"cannot quantize a {type(x).__name__}")
        return [_Quantized(q.astype(np.int64), np.asarray(s), np.asarray(z), None, zp.dtype)]

    def op_DequantizeLinear(self, node: Any, args: list[Any]) -> list[Any]:
        x, scale = args[0], args[1]
        zp = args[2] if len(args) > 2 else None
        axis = self.attrs(node).get("axis", 1)
        if self.attrs(node).get("block_size", 0):
            raise self.error(node, "blocked (per-group) dequantization is not supported")
        if isinstance(x, _Quantized):
            q, dtype = x.q, x.dtype
        elif isinstance(x, np.ndarray) and not np.issubdtype(x.dtype, np.floating):
            q, dtype = x.astype(np.int64), x.dtype
        else:
            raise self.error(node, "reads a float tensor")
        scale = np.asarray(scale, dtype=np.float32)
        z = np.zeros(scale.shape, np.int64) if zp is None else np.asarray(zp).astype(np.int64)
        return [_Quantized(q, scale, z, None if scale.size == 1 else axis, dtype)]

    # -- helpers
    def quantized_inputs(self, node: Any, args: list[Any], count: int) -> list[_Quantized]:
        out = []
        for k, a in enumerate(args[:count]):
            if not isinstance(a, _Quantized):
                raise self.error(
                    node,
                    f"input {k} ({node.input[k]!r}) is not a DequantizeLinear output: the graph "
                    "is not fully integer",
                )
            out.append(a)
        return out

    def _activation_input(self, node: Any, x: _Quantized) -> None:
        if not x.per_tensor:
            raise self.error(node, "activations must be quantized per tensor")

    def _dot(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Exact integer a @ b (int64 result). float64 BLAS is exact while every partial sum
        stays below 2^53 (int8 x int8 products over < 2^37 terms); checked, not assumed."""
        if self.matmul == "int64":
            return a.astype(np.int64) @ b.astype(np.int64)
        bound = float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) * a.shape[-1]
        if bound >= 2.0**53:
            return a.astype(np.int64) @ b.astype(np.int64)
        return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)

    def _accumulate(
        self, node: Any, x: _Quantized, w: _Quantized, bias: _Quantized | None, acc: np.ndarray
    ) -> _Pending:
        """acc: sum((x - zx) * w) with channels on axis 1; adds the INT32 bias and returns the
        requantization."""
        if np.any(w.zp != 0):
            raise self.error(
                node,
                "weights must be symmetric with zero point 0, as microcontroller kernels "
                f"(CMSIS-NN) take them; these have zero point {int(np.asarray(w.zp).flat[0])}: "
                "export the model with target 'mcu-int8' for a fully integer graph",
            )
        sx = np.float64(_scalar(x.scale))
        sw = w.scale.astype(np.float64).reshape(-1)
        channels = acc.shape[1]
        if sw.size not in (1, channels):
            raise self.error(node, f"{sw.size} weight scales for {channels} output channels")
        shape = [1] * acc.ndim
        shape[1] = -1
        if bias is not None:
            if bias.dtype != np.int32 or np.any(bias.zp != 0):
                raise self.error(node, "the bias must be INT32 with zero point 0")
            expected = np.float32(x.scale.reshape(())) * w.scale.astype(np.float32)
            if not np.allclose(bias.scale.reshape(-1), expected.reshape(-1), rtol=1e-6, atol=0):
                raise self.error(node, "the bias scale is not input scale x weight scale")
            acc = acc + np.broadcast_to(bias.q.reshape(-1), (channels,)).reshape(shape)
        if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
            raise self.error(node, "the INT32 accumulator overflows")
        label = self._name(node)

        def finish(so: float, zo: int, lo: int, hi: int) -> np.ndarray:
            mult, shift = quantize_multiplier(sx * sw / np.float64(so))
            if mult.size > 1:
                mult, shift = mult.reshape(shape), shift.reshape(shape)
            y = self.mbqm(acc, mult, shift) + zo
            return np.clip(y, lo, hi)

        return _Pending(finish, label)

    # -- compute ops
    def op_Conv(self, node: Any, args: list[Any]) -> list[Any]:
        x, w = self.quantized_inputs(node, args, 2)
        bias = (
            self.quantized_inputs(node, args[2:], 1)[0]
            if len(args) > 2 and args[2] is not None
            else None
        )
        self._activation_input(node, x)
        at = self.attrs(node)
        if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise self.error(node, "auto_pad is not supported (explicit pads only)")
        spatial = w.q.ndim - 2
        if spatial not in (1, 2):
            raise self.error(node, f"{spatial}-d convolution is not supported (1-d and 2-d are)")
        xc = x.centered()
        wq = w.q
        if spatial == 1:
            xc, wq = xc[:, :, None, :], wq[:, :, None, :]
        strides = list(at.get("strides", [1] * spatial))
        dil = list(at.get("dilations", [1] * spatial))
        pads = list(at.get("pads", [0] * (2 * spatial)))
        if spatial == 1:
            strides, dil, pads = [1] + strides, [1] + dil, [0, pads[0], 0, pads[1]]
        group = int(at.get("group", 1))
        acc = _conv2d(xc, wq, strides, dil, pads, group, self._dot)
        if spatial == 1:
            acc = acc[:, :, 0, :]
        return [self._accumulate(node, x, w, bias, acc)]

    def op_Gemm(self, node: Any, args: list[Any]) -> list[Any]:
        a, b = self.quantized_inputs(node, args, 2)
        bias = (
            self.quantized_inputs(node, args[2:], 1)[0]
            if len(args) > 2 and args[2] is not None
            else None
        )
        self._activation_input(node, a)
        at = self.attrs(node)
        if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0:
            raise self.error(node, "only Gemm with transA=0, alpha=1, beta=1 is supported")
        wq = b.q.T if at.get("transB", 0) else b.q  # (in, out)
        if b.axis not in (None, 0 if at.get("transB", 0) else 1):
            raise self.error(node, "weight scales must be per output feature")
        return [self._accumulate(node, a, b, bias, self._dot(a.centered(), wq))]

    def op_MatMul(self, node: Any, args: list[Any]) -> list[Any]:
        a, b = self.quantized_inputs(node, args, 2)
        self._activation_input(node, a)
        if b.q.ndim != 2 or a.q.ndim != 2:
            raise self.error(node, "only 2-d MatMul with a constant weight is supported")
        if b.axis not in (None, 1):
            raise self.error(node, "weight scales must be per output feature (axis 1)")
        return [self._accumulate(node, a, b, None, self._dot(a.centered(), b.q))]

    def op_Add(self, node: Any, args: list[Any]) -> list[Any]:
        if all(isinstance(a, np.ndarray) for a in args):
            return [args[0] + args[1]]  # shape arithmetic
        a, b = self.quantized_inputs(node, args, 2)
        self._activation_input(node, a)
        self._activation_input(node, b)
        sa, sb = np.float64(_scalar(a.scale)), np.float64(_scalar(b.scale))
        twice_max = 2.0 * max(sa, sb)
        m1, s1 = quantize_multiplier(sa / twice_max)
        m2, s2 = quantize_multiplier(sb / twice_max)
        va = a.centered() * (1 << ADD_LEFT_SHIFT)
        vb = b.centered() * (1 << ADD_LEFT_SHIFT)
        raw = self.mbqm(va, m1, s1) + self.mbqm(vb, m2, s2)

        def finish(so: float, zo: int, lo: int, hi: int) -> np.ndarray:
            mo, shift = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * np.float64(so)))
            return np.clip(self.mbqm(raw, mo, shift) + zo, lo, hi)

        return [_Pending(finish, self._name(node))]

    def _fuse(self, node: Any, x: Any, lo: float | None, hi: float | None) -> _Pending:
        if isinstance(x, _Quantized):  # a standalone activation: requantize, then clamp
            self._activation_input(node, x)
            src = x
            x = _Pending(
                lambda so, zo, a, b: _requantize(src, so, zo, a, b, self.mbqm), self._name(node)
            )
        if not isinstance(x, _Pending):
            raise self.error(node, "reads neither a compute node's result nor a quantized tensor")
        new_lo = lo if x.clamp_lo is None else (x.clamp_lo if lo is None else max(lo, x.clamp_lo))
        new_hi = hi if x.clamp_hi is None else (x.clamp_hi if hi is None else min(hi, x.clamp_hi))
        return _Pending(x.finish, x.label, new_lo, new_hi)

    def op_Relu(self, node: Any, args: list[Any]) -> list[Any]:
        return [self._fuse(node, args[0], 0.0, None)]

    def op_Clip(self, node: Any, args: list[Any]) -> list[Any]:
        lo = float(np.asarray(args[1])) if len(args) > 1 and args[1] is not None else None
        hi = float(np.asarray(args[2])) if len(args) > 2 and args[2] is not None else None
        return [self._fuse(node, args[0], lo, hi)]

    def _average(
        self, node: Any, x: _Quantized, total: np.ndarray, count: int, pool: bool = False
    ) -> _Pending:
        """total: window sums of the stored integers (zero point included), count per window.
        pool: an AveragePool, which TFLite runs on its input's grid only (AVERAGE_POOL_2D keeps
        the grid), followed by a QUANTIZE to another output grid; a mean (MEAN) rescales
        once."""
        sx, zx = np.float64(_scalar(x.scale)), int(x.zp.reshape(()))
        centered = total - zx * count

        def finish(so: float, zo: int, lo: int, hi: int) -> np.ndarray:
            same_grid = np.float32(so) == np.float32(sx) and zo == zx
            if same_grid or pool:
                # TFLite's AveragePool: same grid in and out, divide rounding half away from 0.
                half = count // 2
                t = total
                y = np.where(t > 0, (t + half) // count, -((-t + half) // count))
                if not same_grid:
                    lo_x, hi_x = _dtype_range(x.dtype)
                    pooled = x.like(np.clip(y, lo_x, hi_x))
                    return _requantize(pooled, so, zo, lo, hi, self.mbqm)
            else:
                # TFLite's integer MEAN (QuantizedMeanOrSum): the multiplier of input scale /
                # output scale, shifted left by floor(log2(count)) bits and divided by count in
                # integers (truncated), not the multiplier of the exact quotient.
                mult, shift = quantize_multiplier(sx / np.float64(so))
                bits = min(count.bit_length() - 1, 32, 31 + int(shift))
                mult = (mult.astype(np.int64) << bits) // count
                y = self.mbqm(centered, mult, shift - bits) + zo
            return np.clip(y, lo, hi)

        return _Pending(finish, self._name(node))

    def op_GlobalAveragePool(self, node: Any, args: list[Any]) -> list[Any]:
        (x,) = self.quantized_inputs(node, args, 1)
        self._activation_input(node, x)
        axes = tuple(range(2, x.q.ndim))
        count = int(np.prod([x.q.shape[a] for a in axes]))
        return [self._average(node, x, x.q.sum(axis=axes, keepdims=True), count)]

    def op_ReduceMean(self, node: Any, args: list[Any]) -> list[Any]:
        (x,) = self.quantized_inputs(node, args, 1)
        self._activation_input(node, x)
        at = self.attrs(node)
        axes_arg = args[1] if len(args) > 1 and args[1] is not None else at.get("axes")
        if axes_arg is None:
            raise self.error(node, "reducing over every axis is not supported")
        axes = tuple(sorted(int(a) % x.q.ndim for a in np.asarray(axes_arg).reshape(-1)))
        count = int(np.prod([x.q.shape[a] for a in axes]))
        total = x.q.sum(axis=axes, keepdims=bool(at.get("keepdims", 1)))
        return [self._average(node, x, total, count)]

    def op_AveragePool(self, node: Any, args: list[Any]) -> list[Any]:
        (x,) = self.quantized_inputs(node, args, 1)
        self._activation_input(node, x)
        at = self.attrs(node)
        kernel = list(at["kernel_shape"])
        if any(at.get("pads", [0])) or at.get("ceil_mode", 0) or len(kernel) != 2:
            raise self.error(node, "only 2-d AveragePool without padding or ceil_mode")
        strides = list(at.get("strides", [1, 1]))
        windows = _windows(x.q, kernel, strides, [1, 1])
        total = windows.sum(axis=(-2, -1))
        return [self._average(node, x, total, kernel[0] * kernel[1], pool=True)]

    def op_Concat(self, node: Any, args: list[Any]) -> list[Any]:
        axis = int(self.attrs(node)["axis"])
        if all(isinstance(a, np.ndarray) for a in args):
            return [np.concatenate(args, axis=axis)]
        parts = self.quantized_inputs(node, args, len(args))
        for p in parts:
            self._activation_input(node, p)

        def finish(so: float, zo: int, lo: int, hi: int) -> np.ndarray:
            return np.concatenate(
                [_requantize(p, so, zo, lo, hi, self.mbqm) for p in parts], axis=axis
            )

        return [_Pending(finish, self._name(node))]

    # -- data movement on the integers
    def op_MaxPool(self, node: Any, args: list[Any]) -> list[Any]:
        (x,) = self.quantized_inputs(node, args, 1)
        at = self.attrs(node)
        kernel = list(at["kernel_shape"])
        if len(kernel) != 2 or at.get("ceil_mode", 0) or len(node.output) > 1:
            raise self.error(node, "only 2-d MaxPool without ceil_mode or indices")
        pads = list(at.get("pads", [0, 0, 0, 0]))
        lo, _ = _dtype_range(x.dtype)
        q = np.pad(
            x.q, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=lo
        )
        windows = _windows(
            q, kernel, list(at.get("strides", [1, 1])), list(at.get("dilations", [1, 1]))
        )
        return [x.like(windows.max(axis=(-2, -1)))]

    def _move(
        self, node: Any, args: list[Any], fn: Callable[[np.ndarray], np.ndarray]
    ) -> list[Any]:
        x = args[0]
        if isinstance(x, _Quantized):
            if not x.per_tensor:
                raise self.error(node, "moves a per-channel tensor")
            return [x.like(fn(x.q))]
        if isinstance(x, np.ndarray) and not np.issubdtype(x.dtype, np.floating):
            return [fn(x)]
        raise self.error(node, "reads a float tensor: the graph is not fully integer")

    def op_Resize(self, node: Any, args: list[Any]) -> list[Any]:
        """Nearest-neighbour upsampling (nn.Upsample, F.interpolate mode='nearest'): each output
        value is one input value, so it moves integers. PyTorch's nearest exports with
        coordinate_transformation_mode 'asymmetric' and nearest_mode 'floor'."""
        at = {k: v.decode() if isinstance(v, bytes) else v for k, v in self.attrs(node).items()}
        if (
            at.get("mode", "nearest") != "nearest"
            or at.get("coordinate_transformation_mode", "half_pixel") != "asymmetric"
            or at.get("nearest_mode", "round_prefer_floor") != "floor"
        ):
            raise self.error(
                node, "only nearest resizing (asymmetric coordinates, floor) is integer"
            )
        x = args[0]
        shape = np.asarray((x.q if isinstance(x, _Quantized) else x).shape)
        scales = args[2] if len(args) > 2 and args[2] is not None and np.size(args[2]) else None
        if scales is not None:
            scales = np.asarray(scales, np.float64)
            out = np.floor(shape * scales).astype(np.int64)
        else:
            out = np.asarray(args[3], np.int64)
            scales = out / shape

        def resize(q: np.ndarray) -> np.ndarray:
            for axis in range(q.ndim):
                if out[axis] != shape[axis]:
                    index = np.floor(np.arange(out[axis]) / scales[axis]).astype(np.int64)
                    q = np.take(q, np.minimum(index, shape[axis] - 1), axis=axis)
            return q

        return self._move(node, args[:1], resize)

    def op_Reshape(self, node: Any, args: list[Any]) -> list[Any]:
        shape = np.asarray(args[1]).astype(np.int64).reshape(-1)

        def fn(q: np.ndarray) -> np.ndarray:
            target = [
                q.shape[k] if (s == 0 and not self.attrs(node).get("allowzero", 0)) else int(s)
                for k, s in enumerate(shape)
            ]
            return q.reshape(target)

        return self._move(node, args, fn)

    def op_Flatten(self, node: Any, args: list[Any]) -> list[Any]:
        axis = int(self.attrs(node).get("axis", 1))
        return self._move(
            node, args, lambda q: q.reshape(int(np.prod(q.shape[:axis], dtype=np.int64)), -1)
        )

    def op_Transpose(self, node: Any, args: list[Any]) -> list[Any]:
        perm = self.attrs(node).get("perm")
        return self._move(node, args, lambda q: np.transpose(q, perm))

    def op_Squeeze(self, node: Any, args: list[Any]) -> list[Any]:
        axes = (
            tuple(int(a) for a in np.asarray(args[1]).reshape(-1))
            if len(args) > 1 and args[1] is not None
            else None
        )
        return self._move(node, args, lambda q: np.squeeze(q, axis=axes))

    def op_Unsqueeze(self, node: Any, args: list[Any]) -> list[Any]:
        axes = sorted(int(a) for a in np.asarray(args[1]).reshape(-1))

        def fn(q: np.ndarray) -> np.ndarray:
            for a in axes:
                q = np.expand_dims(q, a % (q.ndim + 1))
            return q

        return self._move(node, args, fn)

    def op_Identity(self, node: Any, args: list[Any]) -> list[Any]:
        return self._move(node, args, lambda q: q)

    def op_Slice(self, node: Any, args: list[Any]) -> list[Any]:
        starts, ends = np.asarray(args[1]).reshape(-1), np.asarray(args[2]).reshape(-1)
        x = args[0]
        ndim = x.q.ndim if isinstance(x, _Quantized) else np.asarray(x).ndim
        axes = (
            np.asarray(args[3]).reshape(-1)
            if len(args) > 3 and args[3] is not None
            else np.arange(len(starts))
        )
        steps = (
            np.asarray(args[4]).reshape(-1)
            if len(args) > 4 and args[4] is not None
            else np.ones(len(starts), np.int64)
        )
        index: list[Any] = [slice(None)] * ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            # ONNX clamps out-of-range ends, as Python slicing does (INT64 max/min included).
            e_val = None if (st < 0 and e < -(2**62)) else int(e)
            index[int(a) % ndim] = slice(int(s), e_val, int(st))
        return self._move(node, args, lambda q: q[tuple(index)])

    def op_Pad(self, node: Any, args: list[Any]) -> list[Any]:
        if self.attrs(node).get("mode", b"constant") not in (b"constant", "constant"):
            raise self.error(node, "only constant padding is supported")
        if len(args) > 2 and args[2] is not None and np.any(np.asarray(args[2]) != 0):
            raise self.error(node, "pads with a value other than 0")
        if len(args) > 3 and args[3] is not None:
            raise self.error(node, "the axes input of Pad is not supported")
        x = args[0]
        if not isinstance(x, _Quantized):
            raise self.error(node, "reads a float tensor: the graph is not fully integer")
        pads = np.asarray(args[1]).astype(np.int64).reshape(-1)
        n = x.q.ndim
        if np.any(pads < 0):
            raise self.error(node, "negative pads are not supported")
        width = [(int(pads[k]), int(pads[k + n])) for k in range(n)]
        # Zero in the real domain is the zero point on the grid.
        return [x.like(np.pad(x.q, width, constant_values=int(x.zp.reshape(()))))]

    # -- shape arithmetic on int64 tensors
    def op_Shape(self, node: Any, args: list[Any]) -> list[Any]:
        x = args[0]
        shape = np.array((x.q if isinstance(x, _Quantized) else np.asarray(x)).shape, np.int64)
        at = self.attrs(node)
        return [shape[at.get("start", 0) : at.get("end", len(shape))]]

    def op_Size(self, node: Any, args: list[Any]) -> list[Any]:
        x = args[0]
        return [np.array((x.q if isinstance(x, _Quantized) else np.asarray(x)).size, np.int64)]

    def op_Gather(self, node: Any, args: list[Any]) -> list[Any]:
        if not all(isinstance(a, np.ndarray) for a in args):
            raise self.error(node, "Gather on activations is not supported")
        return [np.take(args[0], args[1], axis=int(self.attrs(node).get("axis", 0)))]

    def op_Cast(self, node: Any, args: list[Any]) -> list[Any]:
        from onnx import helper

        if not isinstance(args[0], np.ndarray) or np.issubdtype(args[0].dtype, np.floating):
            raise self.error(node, "casts of activations are not supported")
        return [args[0].astype(helper.tensor_dtype_to_np_dtype(self.attrs(node)["to"]))]


def _windows(q: np.ndarray, kernel: list[int], strides: list[int], dil: list[int]) -> np.ndarray:
    """(N, C, Ho, Wo, kh, kw) view of the sliding windows of an NCHW array."""
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    w = np.lib.stride_tricks.sliding_window_view(q, span, axis=(2, 3))
    return w[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]]


def _conv2d(
    xc: np.ndarray,
    wq: np.ndarray,
    strides: list[int],
    dil: list[int],
    pads: list[int],
    group: int,
    dot: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Integer conv of zero-point-centered x (N, C, H, W) with w (M, C/group, kh, kw): int64."""
    x = np.pad(xc, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n = x.shape[0]
    m, cg, kh, kw = wq.shape
    outs = []
    for g in range(group):
        xg = x[:, g * cg : (g + 1) * cg]
        wg = wq[g * (m // group) : (g + 1) * (m // group)]
        win = _windows(xg, [kh, kw], strides, dil)  # N, cg, Ho, Wo, kh, kw
        ho, wo = win.shape[2], win.shape[3]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, cg * kh * kw)
        acc = dot(cols, wg.reshape(wg.shape[0], -1).T)
        outs.append(acc.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2))
    return np.concatenate(outs, axis=1) if group > 1 else outs[0]


def _requantize(
    x: _Quantized,
    so: float,
    zo: int,
    lo: int,
    hi: int,
    mbqm: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """x's integers on the grid (so, zo): unchanged when the grids match, else rescaled by the
    fixed-point multiplier x.scale / so (TFLite's int8 -> int8 QUANTIZE)."""
    sx, zx = _scalar(x.scale), int(x.zp.reshape(()))
    if np.float32(sx) == np.float32(so) and zx == zo:
        return np.clip(x.q, lo, hi)
    mult, shift = quantize_multiplier(np.float64(sx) / np.float64(so))
    return np.clip(mbqm(x.q - zx, mult, shift) + zo, lo, hi)


def _dequantize(x: _Quantized) -> np.ndarray:
    if not x.per_tensor:
        raise IntegerGraphError("graph outputs must be quantized per tensor")
    return ((x.q - int(x.zp.reshape(()))).astype(np.float32) * np.float32(_scalar(x.scale))).astype(
        np.float32
    )


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def run_integer(
    onnx_path: str | os.PathLike[str] | Any,
    inputs: Any,
    batch_size: int = 64,
    matmul: str = "float64",
    rounding: str = "single",
) -> list[np.ndarray] | np.ndarray:
    """Run an exported fully integer (`mcu-int8`) ONNX model with integer arithmetic only and
    return its dequantized float outputs (one array for a one-output model, else a list).

    inputs: an array or tensor (one-input model), a sequence of them (positional), or a dict
    by input name. The batch is cut into `batch_size` pieces. matmul: "float64" sums the
    int8 x int8 products with BLAS, exact (every partial sum below 2^53, checked) and so
    identical to an INT32 accumulator; "int64" sums them with numpy integers (slower, the same
    numbers). rounding: "single" or "double", the fixed-point requantization (module
    docstring). Raises IntegerGraphError naming the node and op type the runner cannot run.
    """
    model = _load(onnx_path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    runner = _Runner(model, matmul, rounding)
    feeds = _feeds(runner.input_names, inputs)
    _check_shapes(model, feeds)
    n = {int(v.shape[0]) for v in feeds.values() if v.ndim}
    if len(n) > 1:
        raise ValueError(f"inputs disagree on the batch size: {sorted(n)}")
    total = n.pop() if n else 1
    if total == 0:
        raise ValueError(f"inputs hold an empty batch: {[tuple(v.shape) for v in feeds.values()]}")
    pieces = [runner.run({k: v[s] for k, v in feeds.items()}) for s in _batches(total, batch_size)]
    outputs = [np.concatenate([p[k] for p in pieces], axis=0) for k in range(len(pieces[0]))]
    return outputs[0] if len(outputs) == 1 else outputs


def _check_shapes(model: Any, feeds: dict[str, np.ndarray]) -> None:
    """ValueError for an input whose rank or fixed dimensions differ from the graph's: the
    runner's kernels would otherwise read a wrong-sized input without complaint."""
    for value in model.graph.input:
        if value.name not in feeds or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        want = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
        got = feeds[value.name].shape
        if len(got) != len(want) or any(
            isinstance(w, int) and w != g for w, g in zip(want, got, strict=False)
        ):
            shown = "(" + ", ".join(str(w) for w in want) + ")"
            raise ValueError(f"input {value.name!r} has shape {got}; the model takes {shown}")


def _feeds(names: list[str], inputs: Any) -> dict[str, np.ndarray]:
    def as_array(v: Any, name: str) -> np.ndarray:
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        arr = np.asarray(v)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"input {name!r} must be a float array, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"input {name!r} holds NaN or Inf")
        return arr.astype(np.float32)

    if isinstance(inputs, dict):
        missing = [k for k in names if k not in inputs]
        if missing:
            raise ValueError(
                f"no value for the model's inputs {missing}; it takes {names}, "
                f"got {sorted(map(str, inputs))}"
            )
        return {k: as_array(inputs[k], k) for k in names}
    seq = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(seq) != len(names):
        raise ValueError(f"the model takes {len(names)} inputs {names}, got {len(seq)}")
    return {k: as_array(v, k) for k, v in zip(names, seq, strict=True)}
