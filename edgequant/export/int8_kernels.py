"""Which 8-bit kernel ONNX Runtime runs on this CPU, and the storage that keeps it exact: on x86
without VNNI its u8s8 kernel sums pairs of products in int16 and can saturate."""

from __future__ import annotations

import torch
from torch import Tensor

from edgequant.ort_kernels import cpu_flags

__all__ = [
    "INT8_CPU_FLAGS",
    "NO_SATURATION_FLAGS",
    "as_uint8",
    "can_saturate",
    "cpu_int8_flags",
    "u8s8_saturates_here",
]

INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
NO_SATURATION_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # u8s8 sums in int32


def cpu_int8_flags() -> set[str] | None:
    """Which of the x86 features that decide ONNX Runtime's 8-bit kernels this CPU has (from
    /proc/cpuinfo), or None where that cannot be read (another OS, another architecture)."""
    flags = cpu_flags()
    return None if flags is None else {f for f in INT8_CPU_FLAGS if f in flags}


def u8s8_saturates_here() -> bool:
    """True when this is an x86 CPU without VNNI, where ONNX Runtime's u8s8 kernel saturates."""
    flags = cpu_int8_flags()
    return flags is not None and not flags & NO_SATURATION_FLAGS


def as_uint8(q: Tensor) -> Tensor:
    """int8 integers (or zero points) as uint8 ones 128 higher: the same dequantized values.

    ONNX Runtime runs an 8-bit layer between uint8 activations (static QDQ after its fusion, or
    DynamicQuantizeLinear + MatMulInteger) in an integer kernel. With int8 weights, on x86 CPUs
    without VNNI (AVX2, AVX-512 before VNNI) that kernel multiplies with VPMADDUBSW, which sums
    each pair of uint8 x int8 products in int16 and saturates (255 x 127 x 2 > 32767), so the
    deployed model quietly differs from the simulation (ONNX Runtime's and OpenVINO's
    "saturation issue"). With uint8 weights it runs its u8u8 kernel, which widens both to 16
    bits first and is exact on every CPU, but runs slower (BENCHMARKS.md). Weights within
    [-64, 64] cannot saturate (255 x 64 x 2 < 32767) and stay int8 (can_saturate): 7-bit
    weights, ONNX Runtime's own reduce_range workaround, keep the fast kernel and stay exact.
    """
    return (q.to(torch.int16) + 128).to(torch.uint8)


def can_saturate(q: Tensor) -> bool:
    """Whether stored int8 weights can overflow the int16 pair sums of a u8s8 kernel (VPMADDUBSW:
    a0 * b0 + a1 * b1 with a <= 255): only when some |b| > 64."""
    return bool(q.to(torch.int16).abs().max() > 64) if q.numel() else False
