"""ONNX Runtime's fused 8-bit kernels in the simulation: the roundings the deployed model makes.

ONNX Runtime (CPU) fuses DequantizeLinear -> Conv [-> Relu] -> QuantizeLinear into QLinearConv
and two DequantizeLinear -> Add [-> Relu] -> QuantizeLinear into QLinearAdd (a Relu goes into
the QuantizeLinear when its zero point is the type's minimum). Neither rounds as the
fake-quantized graph does, so a value within float rounding of a step boundary lands one step
apart, and the difference spreads through the later layers:

- QLinearConv (MLAS MlasRequantizeOutput): the INT32 accumulator plus the INT32 bias, converted
  to float32, times one float32 multiplier per output channel, fl(fl(x_scale * w_scale) /
  y_scale), rounded half to even. The simulation scaled the accumulator by x_scale * w_scale,
  added the bias in float and let the next quantizer multiply by the float32 reciprocal of
  y_scale (PyTorch's fake-quantize): on the pretrained ResNet-20 W8A8 this alone put 85 values
  of test_932 one step apart, one of them in the first layer of the image whose top-1 flipped.
- QLinearAdd (MLAS MlasQLinearAddKernelAvx2Helper, x86 with AVX2): with the integer codes a and
  b as float32 and ratio_a = fl(a_scale / y_scale), ratio_b likewise, t = fma(b, ratio_b,
  fixed), t = fma(a, ratio_a, t), fixed = y_zp - (ratio_a * a_zp + ratio_b * b_zp), rounded
  half to even and saturated to the 8-bit type. x86 without AVX2 (the SSE2 kernel) computes
  (fixed + a * ratio_a) + b * ratio_b without FMA. Other CPUs (Arm's fixed-point kernel) keep
  the fake-quantized float add.

`fuse_like_onnxruntime(gm)` finds these patterns in a quantized GraphModule and makes the
simulation compute them as above, in eval mode on calibrated 8-bit per-tensor grids (elsewhere,
and while calibrating or training, nothing changes). The export is unchanged: a QLinearAdd stand-in
lowers to a plain add (export/lower.py), a layer's fused output is not part of its export form.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.modules import BIAS_QMAX, BIAS_QMIN, QuantConv1d, QuantConv2d, QuantMixin
from edgequant.quantizer import TensorQuantizer
from edgequant.summary import Summary

__all__ = [
    "FusedRequantize",
    "PlainAdd",
    "QLinearAddSim",
    "add_uses_fma",
    "cpu_flags",
    "fuse_like_onnxruntime",
    "qlinear_add",
    "qlinearconv_requantize",
]

_RELUS = (torch_F.relu, torch.relu)
_ADDS = (operator.add, torch.add)


def _container_range(q: TensorQuantizer) -> tuple[int, int]:
    return (-128, 127) if q.spec.signed else (0, 255)


def _fusable_grid(q: TensorQuantizer | None) -> bool:
    """An 8-bit per-tensor activation grid, calibrated and quantizing: what the fused kernels
    take (narrower grids travel behind a Clip or in 4-bit containers, which they do not)."""
    return (
        q is not None
        and q.mode == "quantize"
        and q.spec.bits == 8
        and q.spec.per_tensor
        and q.scale.numel() == 1
    )


def _relu_folds(q: TensorQuantizer, relu: bool) -> bool:
    """A ReLU between the op and its quantizer folds into the quantizer (ONNX Runtime's
    ReluQuantFusion) only when the zero point is the type's minimum."""
    return not relu or int(q.zero_point.reshape(())) == _container_range(q)[0]


def qlinearconv_requantize(
    total: Tensor, multiplier: Tensor, zero_point: int, qmin: int, qmax: int
) -> Tensor:
    """QLinearConv's requantization: the integer `total` (accumulator + INT32 bias, any float
    dtype holding integers) as float32, times the float32 `multiplier` (broadcast), rounded half
    to even, plus the zero point, saturated: the output codes (float32)."""
    scaled = total.float() * multiplier.float()
    return torch.clamp(torch.round(scaled) + zero_point, qmin, qmax)


def cpu_flags() -> set[str] | None:
    """The x86 feature flags of this CPU (/proc/cpuinfo), or None where they cannot be read
    (another OS, another architecture: Arm lists "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return None if line is None else set(line.split(":", 1)[-1].split())


@functools.cache
def add_uses_fma() -> bool | None:
    """Which QLinearAdd kernel ONNX Runtime runs here: True for x86 with AVX2 (FMA), False for
    x86 without it (SSE2), None for other CPUs or where /proc/cpuinfo cannot be read (not
    emulated). Read once: the CPU does not change while a process runs."""
    flags = cpu_flags()
    return None if flags is None else "avx2" in flags


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.float32)


def qlinear_add(
    a: Tensor,
    b: Tensor,
    scales: tuple[float, float, float],
    zero_points: tuple[int, int, int],
    qrange: tuple[int, int],
    fma: bool = True,
) -> Tensor:
    """QLinearAdd of the integer codes a and b (scales and zero points of a, b and the output),
    as MLAS computes it on x86 (see the module docstring): the output codes (float32)."""
    one = torch.ones((), dtype=torch.float32)
    s_a, s_b, s_y = (one * s for s in scales)
    z_a, z_b, z_y = (one * z for z in zero_points)
    ratio_a, ratio_b = s_a / s_y, s_b / s_y
    fixed = z_y - (ratio_a * z_a + ratio_b * z_b)
    a32, b32 = _f32(a), _f32(b)
    if fma:
        # A float32 FMA rounds once: the product of an 8-bit integer and a float32 and the sum
        # with a float32 are exact in float64, so one rounding to float32 gives the same bits.
        t = _f32(b32.double() * ratio_b.double() + fixed.double())
        t = _f32(a32.double() * ratio_a.double() + t.double())
    else:
        t = (fixed + a32 * ratio_a) + b32 * ratio_b
    return torch.clamp(torch.round(t), *qrange)


@dataclass
class FusedRequantize:
    """A quantized conv's output as QLinearConv rounds it onto the grid of `quantizer`, the
    quantizer that follows it (through a ReLU when `relu`)."""

    quantizer: TensorQuantizer
    relu: bool

    def active(self, layer: QuantMixin) -> bool:
        iq = layer.input_quantizer
        q = self.quantizer
        return (
            _fusable_grid(iq)
            and _fusable_grid(q)
            and layer.weight_quantizer is not None
            # 8-bit containers: ONNX Runtime runs a conv with INT4 weights as a float Conv.
            and 4 < layer.weight_quantizer.spec.bits <= 8
            and _relu_folds(q, self.relu)
        )

    def __call__(self, layer: QuantMixin, acc: Tensor) -> Tensor:
        """The layer's output (on the quantizer's grid) from its exact accumulator `acc`."""
        iq, wq, q = layer.input_quantizer, layer.weight_quantizer, self.quantizer
        assert iq is not None and wq is not None
        shape = [1] * acc.dim()
        shape[1] = -1
        acc_scale = (iq.scale.reshape(()) * wq.scale).float()
        total = acc
        if layer.bias is not None:
            axis = 0 if acc_scale.numel() > 1 else None
            zp = torch.zeros(acc_scale.shape, dtype=torch.int32)
            bias_q = F.quantize(layer.bias.detach(), acc_scale, zp, BIAS_QMIN, BIAS_QMAX, axis)
            total = acc + bias_q.to(acc.dtype).expand(layer.bias.shape).reshape(shape)
        multiplier = acc_scale / q.scale.reshape(()).float()
        y_zp = int(q.zero_point.reshape(()))
        qmin, qmax = _container_range(q)
        if self.relu:
            qmin = max(qmin, y_zp)
        codes = qlinearconv_requantize(total, multiplier.reshape(shape), y_zp, qmin, qmax)
        return (codes - y_zp) * q.scale.reshape(()).float()


class PlainAdd(nn.Module):
    """a + b: a QLinearAddSim as the export writes it (the runtime fuses the add itself)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class QLinearAddSim(nn.Module):
    """`a + b` of two quantized tensors whose sum is quantized (through a ReLU when `relu`): in
    eval mode on fusable grids, QLinearAdd's arithmetic; otherwise the float add. Holds no
    state of its own; the quantizers are referenced, not owned."""

    def __init__(
        self, a: TensorQuantizer, b: TensorQuantizer, out: TensorQuantizer, relu: bool
    ) -> None:
        super().__init__()
        self.__dict__["quantizers"] = (a, b, out)  # not submodules: the graph owns them
        self.relu = relu
        self.exact_integer = True  # turned off by modules.fast_simulation, as a layer's is

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        qa, qb, qy = cast(tuple[TensorQuantizer, ...], self.__dict__["quantizers"])
        fma = add_uses_fma()
        if (
            self.training
            or not self.exact_integer
            or fma is None
            or not all(_fusable_grid(q) for q in (qa, qb, qy))
            or not _relu_folds(qy, self.relu)
            or a.shape != b.shape
        ):
            return a + b
        scales = tuple(float(q.scale.reshape(())) for q in (qa, qb, qy))
        zps = tuple(int(q.zero_point.reshape(())) for q in (qa, qb, qy))
        # a and b are on their grids: dividing by the scale gives their integers back.
        codes_a = torch.round(a / qa.scale.reshape(())) + zps[0]
        codes_b = torch.round(b / qb.scale.reshape(())) + zps[1]
        qmin, qmax = _container_range(qy)
        if self.relu:
            qmin = max(qmin, zps[2])
        codes = qlinear_add(codes_a, codes_b, scales, zps, (qmin, qmax), fma)  # type: ignore[arg-type]
        return (codes - zps[2]) * qy.scale.reshape(()).float()

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _RELUS
    if node.op == "call_method":
        return node.target == "relu"
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.ReLU)


def _following_quantizer(
    node: torch.fx.Node, modules: dict[str, nn.Module]
) -> tuple[TensorQuantizer, bool] | None:
    """The activation quantizer that alone reads `node`'s output (through one ReLU at most),
    and whether a ReLU is between; None when the output goes anywhere else too."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    relu = _is_relu(user, modules)
    if relu:
        if len(user.users) != 1:
            return None
        node, user = user, next(iter(user.users))
    if user.op != "call_module" or not user.args or user.args[0] is not node:
        return None
    target = modules.get(str(user.target))
    if isinstance(target, TensorQuantizer) and target.role == "activation":
        return target, relu
    if isinstance(target, QuantMixin) and not target.shared_input:
        # The next layer quantizes its own input: that QuantizeLinear is the one fused.
        q = target.input_quantizer
        return (q, relu) if q is not None else None
    return None


def _quantizer_of(node: Any, modules: dict[str, nn.Module]) -> TensorQuantizer | None:
    if not isinstance(node, torch.fx.Node) or node.op != "call_module":
        return None
    target = modules.get(str(node.target))
    return target if isinstance(target, TensorQuantizer) and target.role == "activation" else None


def fuse_like_onnxruntime(gm: nn.Module, summary: Summary | None = None) -> nn.Module:
    """Make the simulation of GraphModule `gm` round as ONNX Runtime's QLinearConv and
    QLinearAdd do (module docstring), in place: each quantized conv whose output only its next
    quantizer reads gets a FusedRequantize; each add of two quantized tensors whose sum is then
    quantized becomes a QLinearAddSim. Returns `gm`. A model that is not a GraphModule (no graph
    quantizers), or whose `summary` names a target other than onnxruntime, is left as it is;
    otherwise `summary` gets a note saying what changed."""
    if summary is not None and summary.target != "onnxruntime":
        return gm
    if not isinstance(gm, torch.fx.GraphModule):
        return gm
    modules = dict(gm.named_modules())
    convs: list[str] = []
    adds: list[str] = []
    holder = nn.Module()
    for node in list(gm.graph.nodes):
        layer = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(layer, (QuantConv1d, QuantConv2d)):
            found = _following_quantizer(node, modules)
            if found is not None:
                layer.__dict__["fused_requantize"] = FusedRequantize(*found)
                convs.append(str(node.target))
            continue
        if node.op != "call_function" or node.target not in _ADDS or node.kwargs:
            continue
        if len(node.args) != 2:
            continue
        qa, qb = (_quantizer_of(arg, modules) for arg in node.args)
        found = _following_quantizer(node, modules)
        if qa is None or qb is None or found is None:
            continue
        if len({qa.spec.signed, qb.spec.signed, found[0].spec.signed}) != 1:
            continue  # QLinearAdd takes one 8-bit type for both inputs and the output
        name = f"add_{len(adds)}"
        if not adds:
            gm.add_module("fused_adds", holder)  # before the graph names a module in it
        holder.add_module(name, QLinearAddSim(qa, qb, found[0], found[1]))
        with gm.graph.inserting_after(node):
            fused = gm.graph.call_module(f"fused_adds.{name}", cast(Any, node.args))
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        adds.append(name)
    if adds:
        holder.train(gm.training)  # new modules start in training mode; take the model's
        gm.graph.lint()
        gm.recompile()
    if summary is not None and (convs or adds):
        summary.notes.append(
            f"the simulation rounds {len(convs)} conv outputs and {len(adds)} adds as ONNX "
            "Runtime's fused QLinearConv / QLinearAdd kernels do (8-bit grids, eval mode), so "
            "that it computes what the onnxruntime target deploys"
        )
    return gm
