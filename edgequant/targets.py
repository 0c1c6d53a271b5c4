"""Hardware targets: the grid rules each target's integer kernels impose on weight and activation
specs, looked up by name in TARGETS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgequant.spec import QuantSpec

# A target is the set of grid rules its integer kernels impose. Recipe.for_target rewrites a
# recipe's specs (defaults and overrides) to those rules and keeps what the target leaves free:
# bit widths, observers, first_last_bits, skips.


def _per_channel(spec: QuantSpec) -> QuantSpec:
    """Per output channel; per-group grids (no integer kernel in these runtimes) become per-channel."""
    if spec.granularity == "channel":
        return spec
    return spec.replace(granularity="channel", axis=0, group_size=None)


def _per_tensor_activation(spec: QuantSpec, **changes: Any) -> QuantSpec:
    """One activation grid per tensor (what these runtimes' kernels take), with `changes`."""
    return spec.replace(granularity="tensor", axis=0, group_size=None, **changes)


@dataclass(frozen=True)
class Target:
    """Base of the target registry: rewrites weight and activation specs, nothing else."""

    name: str = "onnxruntime"
    description: str = ""
    # Fully integer targets (no float op between the input's QuantizeLinear and the output's
    # DequantizeLinear): graph_quantizers.place_graph_quantizers quantizes every activation edge
    # (adds, pooling, concatenation, data movement, the model's outputs), and the export drops
    # activations that the following quantizer's range already applies.
    fully_integer: bool = False

    def weight(self, spec: QuantSpec) -> QuantSpec:
        return spec

    def activation(self, spec: QuantSpec) -> QuantSpec:
        return spec


@dataclass(frozen=True)
class OnnxRuntimeTarget(Target):
    """The default: ORT runs any QDQ grid, so the recipe's specs are kept as they are."""

    name: str = "onnxruntime"
    description: str = (
        "ONNX Runtime CPU: symmetric per-channel 8-bit weights (stored as UINT8 + 128 beside "
        "UINT8 activations: ONNX Runtime's u8s8 kernel saturates on x86 without VNNI), "
        "asymmetric UINT8 activations (the presets' defaults; a recipe's own specs are kept)"
    )


@dataclass(frozen=True)
class TFLiteInt8Target(Target):
    """TFLite's int8 quantization spec: weights -127..127 per channel, activations int8 + zero point."""

    name: str = "tflite-int8"
    description: str = (
        "TFLite int8: symmetric per-channel weights in -(2^(b-1)-1)..2^(b-1)-1 (narrow range), "
        "asymmetric signed per-tensor activations, INT32 bias. Not yet: quantizing every op "
        "(adds, pooling) in the graph"
    )

    def weight(self, spec: QuantSpec) -> QuantSpec:
        return _per_channel(spec).replace(signed=True, symmetric=True, narrow_range=True)

    def activation(self, spec: QuantSpec) -> QuantSpec:
        return _per_tensor_activation(spec, signed=True, symmetric=False, narrow_range=False)


@dataclass(frozen=True)
class TensorRTTarget(Target):
    """TensorRT's explicit quantization: zero points must be 0 everywhere."""

    name: str = "tensorrt"
    description: str = (
        "TensorRT: symmetric signed per-channel weights, symmetric signed per-tensor activations "
        "(all zero points 0)"
    )

    def weight(self, spec: QuantSpec) -> QuantSpec:
        return _per_channel(spec).replace(signed=True, symmetric=True)

    def activation(self, spec: QuantSpec) -> QuantSpec:
        return _per_tensor_activation(spec, signed=True, symmetric=True)


@dataclass(frozen=True)
class DspPow2Target(Target):
    """Fixed-point DSPs rescale by shifting, so every scale must be 2^k (Q-format, zero point 0)."""

    name: str = "dsp-pow2"
    description: str = (
        "fixed-point DSP: every scale a power of two (rescaling is a shift), symmetric signed "
        "per-channel weights and symmetric signed per-tensor activations. Not yet: PACT-style "
        "clipping in QAT"
    )

    def weight(self, spec: QuantSpec) -> QuantSpec:
        return _per_channel(spec).replace(signed=True, symmetric=True, scale_type="pow2")

    def activation(self, spec: QuantSpec) -> QuantSpec:
        return _per_tensor_activation(
            spec,
            signed=True,
            symmetric=True,
            scale_type="pow2",
        )


@dataclass(frozen=True)
class McuInt8Target(TFLiteInt8Target):
    """Microcontrollers (CMSIS-NN, TFLite Micro) follow TFLite's int8 grids."""

    name: str = "mcu-int8"
    description: str = (
        "microcontroller int8 (CMSIS-NN, TFLite Micro): the tflite-int8 grids on a fully integer "
        "graph: every activation edge quantized (adds, pooling, concatenation, reshapes, the "
        "outputs), ReLU/ReLU6 folded into the quantizer's range, INT32 bias; eq.run_integer "
        "runs the export with integer arithmetic only (multiplier-and-shift requantization)"
    )
    fully_integer: bool = True


@dataclass(frozen=True)
class ExecuTorchTarget(TFLiteInt8Target):
    """ExecuTorch's XNNPACK backend: the grids its own XNNPACKQuantizer writes, which are
    TFLite's int8 grids."""

    name: str = "executorch"
    description: str = (
        "ExecuTorch (XNNPACK backend): symmetric signed per-channel weights in "
        "-(2^(b-1)-1)..2^(b-1)-1 (narrow range), asymmetric signed (int8) per-tensor activations; "
        "eq.export_executorch writes the .pte and verifies it in ExecuTorch's runtime"
    )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        OnnxRuntimeTarget(),
        TFLiteInt8Target(),
        TensorRTTarget(),
        DspPow2Target(),
        McuInt8Target(),
        ExecuTorchTarget(),
    )
}
