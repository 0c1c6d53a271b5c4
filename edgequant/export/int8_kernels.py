"""Which 8-bit kernel ONNX Runtime runs on this CPU, and the storage that keeps it exact: on x86
without VNNI its u8s8 kernel sums pairs of products in int16 and can saturate."""

from __future__ import annotations

import platform

import torch
from torch import Tensor

from edgequant.ort_kernels import cpu_flags

__all__ = [
    "INT8_CPU_FLAGS",
    "NO_SATURATION_FLAGS",
    "WEIGHT_STORAGE",
    "as_uint8",
    "can_saturate",
    "cpu_int8_flags",
    "resolve_weight_storage",
    "u8s8_exact_here",
    "u8s8_saturates_here",
]

INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
WEIGHT_STORAGE = ("auto", "exact", "int8")  # export_onnx's weight_storage values
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


def u8s8_exact_here() -> bool:
    """True where this machine's ONNX Runtime runs u8s8 products exactly: an x86 CPU with VNNI
    (or AMX), whose kernels sum in int32, or an Arm one (dot-product kernels). False on x86
    without VNNI and wherever the CPU cannot be told (another OS on x86)."""
    flags = cpu_int8_flags()
    if flags is not None:
        return bool(flags & NO_SATURATION_FLAGS)
    return platform.machine().lower() in ("aarch64", "arm64")


def resolve_weight_storage(weight_storage: str) -> str:
    """export_onnx's weight_storage as the lowering applies it: "auto" is "int8" where this
    machine runs the u8s8 kernel exactly (u8s8_exact_here; verification runs here too) and
    "exact" elsewhere; "exact" and "int8" are themselves."""
    if weight_storage not in WEIGHT_STORAGE:
        raise ValueError(
            f"weight_storage must be one of 'auto', 'exact', 'int8', got {weight_storage!r}"
        )
    if weight_storage != "auto":
        return weight_storage
    return "int8" if u8s8_exact_here() else "exact"


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
