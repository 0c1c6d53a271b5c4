"""What the integer runner (export/integer.py) holds while it runs: integers with their grid
(Quantized), a compute node's result before its QuantizeLinear (Pending), and the ops that only
move integers (data movement, shape arithmetic), which need no arithmetic on the values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgequant.export.fixed_point import quantize_multiplier
from edgequant.export.integer_graph import IntegerGraphError, dtype_range


@dataclass
class Quantized:
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

    def like(self, q: np.ndarray) -> Quantized:
        return Quantized(q, self.scale, self.zp, self.axis, self.dtype)


@dataclass
class Pending:
    """A compute node's result before its QuantizeLinear: `finish(scale, zp, lo, hi)` gives
    the output integers on that grid, clamped to [lo, hi] (the type range narrowed by any
    fused activation). clamp: the fused activation's float bounds."""

    finish: Callable[[float, int, int, int], np.ndarray]
    label: str
    clamp_lo: float | None = None
    clamp_hi: float | None = None


def tflite_round(v: float) -> int:
    return int(np.floor(abs(v) + 0.5) * (1 if v >= 0 else -1))


def scalar(a: np.ndarray) -> float:
    return float(np.asarray(a).reshape(()))


def sliding_windows(
    q: np.ndarray, kernel: list[int], strides: list[int], dil: list[int]
) -> np.ndarray:
    """(N, C, Ho, Wo, kh, kw) view of the sliding windows of an NCHW array."""
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    w = np.lib.stride_tricks.sliding_window_view(q, span, axis=(2, 3))
    return w[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]]


def as_2d_window(
    q: np.ndarray, at: dict[str, Any]
) -> tuple[list[int], list[int], list[int], list[int], np.ndarray]:
    """A pool's kernel, strides, dilations and pads (ONNX attributes `at`) and its input, a 1-d
    pool's (N, C, L) written as the 2-d pool of (N, C, 1, L)."""
    kernel = list(at["kernel_shape"])
    strides = list(at.get("strides", [1] * len(kernel)))
    dilations = list(at.get("dilations", [1] * len(kernel)))
    pads = list(at.get("pads", [0] * 2 * len(kernel)))
    if len(kernel) == 1 and q.ndim == 3:
        return [1, *kernel], [1, *strides], [1, *dilations], [0, pads[0], 0, pads[1]], q[:, :, None]
    return kernel, strides, dilations, pads, q


def requantize(
    x: Quantized,
    so: float,
    zo: int,
    lo: int,
    hi: int,
    mbqm: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """x's integers on the grid (so, zo): unchanged when the grids match, else rescaled by the
    fixed-point multiplier x.scale / so (TFLite's int8 -> int8 QUANTIZE)."""
    sx, zx = scalar(x.scale), int(x.zp.reshape(()))
    if np.float32(sx) == np.float32(so) and zx == zo:
        return np.clip(x.q, lo, hi)
    mult, shift = quantize_multiplier(np.float64(sx) / np.float64(so))
    return np.clip(mbqm(x.q - zx, mult, shift) + zo, lo, hi)


def dequantize(x: Quantized) -> np.ndarray:
    if not x.per_tensor:
        raise IntegerGraphError("graph outputs must be quantized per tensor")
    return ((x.q - int(x.zp.reshape(()))).astype(np.float32) * np.float32(scalar(x.scale))).astype(
        np.float32
    )


def conv2d(
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
        win = sliding_windows(xg, [kh, kw], strides, dil)  # N, cg, Ho, Wo, kh, kw
        ho, wo = win.shape[2], win.shape[3]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, cg * kh * kw)
        acc = dot(cols, wg.reshape(wg.shape[0], -1).T)
        outs.append(acc.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2))
    return np.concatenate(outs, axis=1) if group > 1 else outs[0]


class RunnerBase:
    """The integer runner's view of a node (its name, attributes, quantized inputs) and its
    kernels for the ops that only move integers."""

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

    def quantized_inputs(self, node: Any, args: list[Any], count: int) -> list[Quantized]:
        out = []
        for k, a in enumerate(args[:count]):
            if not isinstance(a, Quantized):
                raise self.error(
                    node,
                    f"input {k} ({node.input[k]!r}) is not a DequantizeLinear output: the graph "
                    "is not fully integer",
                )
            out.append(a)
        return out

    def optional_bias(self, node: Any, args: list[Any]) -> Quantized | None:
        """The third input (Conv's or Gemm's bias) where the node has one, checked as
        quantized_inputs checks an input."""
        if len(args) > 2 and args[2] is not None:
            return self.quantized_inputs(node, args[2:], 1)[0]
        return None

    # -- data movement on the integers
    def op_MaxPool(self, node: Any, args: list[Any]) -> list[Any]:
        (x,) = self.quantized_inputs(node, args, 1)
        at = self.attrs(node)
        kernel, strides, dilations, pads, q = as_2d_window(x.q, at)
        if len(kernel) != 2 or at.get("ceil_mode", 0) or len(node.output) > 1:
            raise self.error(node, "only 1-d and 2-d MaxPool without ceil_mode or indices")
        lo, _ = dtype_range(x.dtype)
        q = np.pad(q, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=lo)
        pooled = sliding_windows(q, kernel, strides, dilations).max(axis=(-2, -1))
        return [x.like(pooled if x.q.ndim == 4 else pooled[:, :, 0])]

    def _move(
        self, node: Any, args: list[Any], fn: Callable[[np.ndarray], np.ndarray]
    ) -> list[Any]:
        x = args[0]
        if isinstance(x, Quantized):
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
        shape = np.asarray((x.q if isinstance(x, Quantized) else x).shape)
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
        ndim = x.q.ndim if isinstance(x, Quantized) else np.asarray(x).ndim
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
        if not isinstance(x, Quantized):
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
        shape = np.array((x.q if isinstance(x, Quantized) else np.asarray(x)).shape, np.int64)
        at = self.attrs(node)
        return [shape[at.get("start", 0) : at.get("end", len(shape))]]

    def op_Size(self, node: Any, args: list[Any]) -> list[Any]:
        x = args[0]
        return [np.array((x.q if isinstance(x, Quantized) else np.asarray(x)).size, np.int64)]

    def op_Gather(self, node: Any, args: list[Any]) -> list[Any]:
        if not all(isinstance(a, np.ndarray) for a in args):
            raise self.error(node, "Gather on activations is not supported")
        return [np.take(args[0], args[1], axis=int(self.attrs(node).get("axis", 0)))]

    def op_Cast(self, node: Any, args: list[Any]) -> list[Any]:
        from onnx import helper

        if not isinstance(args[0], np.ndarray) or np.issubdtype(args[0].dtype, np.floating):
            raise self.error(node, "casts of activations are not supported")
        return [args[0].astype(helper.tensor_dtype_to_np_dtype(self.attrs(node)["to"]))]
