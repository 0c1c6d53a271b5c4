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
roundings decides, far more often than (1) and (2). A one-step difference in one layer can move
later layers' values too. How often each happens on the pretrained ResNet-20 mcu-int8 export:
benchmarks/integer_resnet20.py (results in benchmarks/results/integer_resnet20.json).

The graph property itself and the rewrites that give an export it: export/integer_graph.py;
the fixed-point arithmetic: export/fixed_point.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgequant.export.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    ROUNDINGS,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
)
from edgequant.export.integer_graph import (
    IntegerGraphError,
    constant_arrays,
    dtype_range,
    load_model,
)
from edgequant.export.integer_values import (
    Pending,
    Quantized,
    RunnerBase,
    as_2d_window,
    conv2d,
    dequantize,
    requantize,
    scalar,
    sliding_windows,
    tflite_round,
)

# TFLite's int8 ADD: inputs are shifted left by this many bits before rescaling.
ADD_LEFT_SHIFT = 20


class IntegerRunner(RunnerBase):
    """Executes a fully integer QDQ graph node by node on integers (run_integer's engine)."""

    def __init__(self, model: Any, matmul: str, rounding: str = "single") -> None:
        if matmul not in ("float64", "int64"):
            raise ValueError(f"matmul must be 'float64' or 'int64', got {matmul!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.rounding = rounding
        self.model = model
        self.graph = model.graph
        self.matmul = matmul
        self.consts = constant_arrays(self.graph)
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

    def run(
        self, feeds: dict[str, np.ndarray], trace: dict[str, Any] | None = None
    ) -> list[np.ndarray]:
        """The graph's outputs; `trace`, when given, receives every tensor by name (the
        quantized ones as Quantized), for locating where another runtime first differs."""
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
            if isinstance(v, Quantized):
                outputs.append(dequantize(v))
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
        s = np.float32(scalar(scale))
        z = int(np.asarray(zp).reshape(()))
        lo, hi = dtype_range(zp.dtype)
        if isinstance(x, Pending):
            a, b = lo, hi
            if x.clamp_lo is not None:
                a = max(lo, z + tflite_round(x.clamp_lo / float(s)))
            if x.clamp_hi is not None:
                b = min(hi, z + tflite_round(x.clamp_hi / float(s)))
            q = x.finish(float(s), z, a, b)
        elif isinstance(x, Quantized):
            q = requantize(x, float(s), z, lo, hi, self.mbqm)
        elif isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            # The model's float input: the one place floats are quantized (as ORT does it).
            q = np.clip(np.rint(x.astype(np.float32) / s).astype(np.int64) + z, lo, hi)
        else:
            raise self.error(node, f"cannot quantize a {type(x).__name__}")
        return [Quantized(q.astype(np.int64), np.asarray(s), np.asarray(z), None, zp.dtype)]

    def op_DequantizeLinear(self, node: Any, args: list[Any]) -> list[Any]:
        x, scale = args[0], args[1]
        zp = args[2] if len(args) > 2 else None
        axis = self.attrs(node).get("axis", 1)
        if self.attrs(node).get("block_size", 0):
            raise self.error(node, "blocked (per-group) dequantization is not supported")
        if isinstance(x, Quantized):
            q, dtype = x.q, x.dtype
        elif isinstance(x, np.ndarray) and not np.issubdtype(x.dtype, np.floating):
            q, dtype = x.astype(np.int64), x.dtype
        else:
            raise self.error(node, "reads a float tensor")
        scale = np.asarray(scale, dtype=np.float32)
        z = np.zeros(scale.shape, np.int64) if zp is None else np.asarray(zp).astype(np.int64)
        return [Quantized(q, scale, z, None if scale.size == 1 else axis, dtype)]

    def _activation_input(self, node: Any, x: Quantized) -> None:
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
        self, node: Any, x: Quantized, w: Quantized, bias: Quantized | None, acc: np.ndarray
    ) -> Pending:
        """acc: sum((x - zx) * w) with channels on axis 1; adds the INT32 bias and returns the
        requantization."""
        if np.any(w.zp != 0):
            raise self.error(
                node,
                "weights must be symmetric with zero point 0, as microcontroller kernels "
                f"(CMSIS-NN) take them; these have zero point {int(np.asarray(w.zp).flat[0])}: "
                "export the model with target 'mcu-int8' for a fully integer graph",
            )
        sx = np.float64(scalar(x.scale))
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

        return Pending(finish, label)

    # -- compute ops
    def op_Conv(self, node: Any, args: list[Any]) -> list[Any]:
        x, w = self.quantized_inputs(node, args, 2)
        bias = self.optional_bias(node, args)
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
        acc = conv2d(xc, wq, strides, dil, pads, group, self._dot)
        if spatial == 1:
            acc = acc[:, :, 0, :]
        return [self._accumulate(node, x, w, bias, acc)]

    def op_Gemm(self, node: Any, args: list[Any]) -> list[Any]:
        a, b = self.quantized_inputs(node, args, 2)
        bias = self.optional_bias(node, args)
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
        sa, sb = np.float64(scalar(a.scale)), np.float64(scalar(b.scale))
        twice_max = 2.0 * max(sa, sb)
        m1, s1 = quantize_multiplier(sa / twice_max)
        m2, s2 = quantize_multiplier(sb / twice_max)
        va = a.centered() * (1 << ADD_LEFT_SHIFT)
        vb = b.centered() * (1 << ADD_LEFT_SHIFT)
        raw = self.mbqm(va, m1, s1) + self.mbqm(vb, m2, s2)

        def finish(so: float, zo: int, lo: int, hi: int) -> np.ndarray:
            mo, shift = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * np.float64(so)))
            return np.clip(self.mbqm(raw, mo, shift) + zo, lo, hi)

        return [Pending(finish, self._name(node))]

    def _fuse(self, node: Any, x: Any, lo: float | None, hi: float | None) -> Pending:
        if isinstance(x, Quantized):  # a standalone activation: requantize, then clamp
            self._activation_input(node, x)
            src = x
            x = Pending(
                lambda so, zo, a, b: requantize(src, so, zo, a, b, self.mbqm), self._name(node)
            )
        if not isinstance(x, Pending):
            raise self.error(node, "reads neither a compute node's result nor a quantized tensor")
        new_lo = lo if x.clamp_lo is None else (x.clamp_lo if lo is None else max(lo, x.clamp_lo))
        new_hi = hi if x.clamp_hi is None else (x.clamp_hi if hi is None else min(hi, x.clamp_hi))
        return Pending(x.finish, x.label, new_lo, new_hi)

    def op_Relu(self, node: Any, args: list[Any]) -> list[Any]:
        return [self._fuse(node, args[0], 0.0, None)]

    def op_Clip(self, node: Any, args: list[Any]) -> list[Any]:
        lo = float(np.asarray(args[1])) if len(args) > 1 and args[1] is not None else None
        hi = float(np.asarray(args[2])) if len(args) > 2 and args[2] is not None else None
        return [self._fuse(node, args[0], lo, hi)]

    def _average(
        self, node: Any, x: Quantized, total: np.ndarray, count: int, pool: bool = False
    ) -> Pending:
        """total: window sums of the stored integers (zero point included), count per window.
        pool: an AveragePool, which TFLite runs on its input's grid only (AVERAGE_POOL_2D keeps
        the grid), followed by a QUANTIZE to another output grid; a mean (MEAN) rescales
        once."""
        sx, zx = np.float64(scalar(x.scale)), int(x.zp.reshape(()))
        centered = total - zx * count

        def finish(so: float, zo: int, lo: int, hi: int) -> np.ndarray:
            same_grid = np.float32(so) == np.float32(sx) and zo == zx
            if same_grid or pool:
                # TFLite's AveragePool: same grid in and out, divide rounding half away from 0.
                half = count // 2
                t = total
                y = np.where(t > 0, (t + half) // count, -((-t + half) // count))
                if not same_grid:
                    lo_x, hi_x = dtype_range(x.dtype)
                    pooled = x.like(np.clip(y, lo_x, hi_x))
                    return requantize(pooled, so, zo, lo, hi, self.mbqm)
            else:
                # TFLite's integer MEAN (QuantizedMeanOrSum): the multiplier of input scale /
                # output scale, shifted left by floor(log2(count)) bits and divided by count in
                # integers (truncated), not the multiplier of the exact quotient.
                mult, shift = quantize_multiplier(sx / np.float64(so))
                bits = min(count.bit_length() - 1, 32, 31 + int(shift))
                mult = (mult.astype(np.int64) << bits) // count
                y = self.mbqm(centered, mult, shift - bits) + zo
            return np.clip(y, lo, hi)

        return Pending(finish, self._name(node))

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
        kernel, strides, _, pads, q = as_2d_window(x.q, at)
        if any(pads) or at.get("ceil_mode", 0) or len(kernel) != 2:
            raise self.error(node, "only 1-d and 2-d AveragePool without padding or ceil_mode")
        total = sliding_windows(q, kernel, strides, [1, 1]).sum(axis=(-2, -1))
        total = total if x.q.ndim == 4 else total[:, :, 0]
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
                [requantize(p, so, zo, lo, hi, self.mbqm) for p in parts], axis=axis
            )

        return [Pending(finish, self._name(node))]


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
    model = load_model(onnx_path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    runner = IntegerRunner(model, matmul, rounding)
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
