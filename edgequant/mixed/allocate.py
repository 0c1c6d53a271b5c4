"""Bit allocation under a budget, solved exactly as an integer linear program.
Dong et al., "HAWQ-V3: Dyadic Neural Network Quantization", ICML 2021, section 3.3 (the ILP):
one binary x[l, b] per (layer, bit width), exactly one width per layer, minimize
sum s[l, b] x[l, b] subject to linear resource constraints (size, BOPs, latency).

Sizes are packed weight sizes, parameters x bits / 8 (DESIGN §1): what a bit-packing runtime or a
microcontroller stores. ONNX has no INT3/INT2, so the exported file stores 3- and 2-bit weights in
INT4 containers and is larger than the packed size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgequant.spec import MAX_BITS, MIN_BITS

FP32_BITS = 32
DEFAULT_CANDIDATES = (2, 3, 4, 8)


@dataclass(frozen=True)
class Budget:
    """Resource bounds of a mixed-precision plan; at least one must be given.

    size_bytes: packed weight bytes (sum of parameters x bits / 8 over the quantized layers).
    size_ratio: packed weight bytes relative to the same weights in FP32 (8 bits everywhere: 0.25).
    bops: bit operations per sample, sum of MACs x weight bits x activation bits.
    latency_ms: sum of per-layer latencies from a measured table (`latency_table` of allocate);
    a runtime's latency does not follow from bits alone (ONNX Runtime runs INT4 containers
    through the same kernels as INT8), so there is no model of it without measurements.
    """

    size_bytes: float | None = None
    size_ratio: float | None = None
    bops: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.as_dict().items() if v is not None}
        if not given:
            raise ValueError(
                "Budget needs at least one bound: size_bytes=, size_ratio=, bops= or latency_ms="
            )
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Budget.{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"Budget.{name} must be a positive finite number, got {value!r}")
        if self.size_ratio is not None and self.size_ratio > 1:
            raise ValueError(
                f"Budget.size_ratio={self.size_ratio} is above 1 (the FP32 weights' size): "
                "give a fraction, e.g. 0.1 for 3.2 bits per weight on average"
            )

    def as_dict(self) -> dict[str, float | None]:
        return {
            "size_bytes": self.size_bytes,
            "size_ratio": self.size_ratio,
            "bops": self.bops,
            "latency_ms": self.latency_ms,
        }

    @classmethod
    def average_bits(cls, bits: float) -> Budget:
        """A size budget of `bits` weight bits per parameter on average (size_ratio bits / 32)."""
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 32:
            raise ValueError(f"average bits must be a number in (0, 32], got {bits!r}")
        return cls(size_ratio=bits / FP32_BITS)

    def __str__(self) -> str:
        parts = [f"{k}={v:g}" for k, v in self.as_dict().items() if v is not None]
        return f"Budget({', '.join(parts)})"


@dataclass(frozen=True)
class Allocation:
    """The solution of the integer program."""

    bits: dict[str, int]
    objective: float
    packed_bytes: float
    fp32_bytes: float
    bops: float | None
    latency_ms: float | None
    solver_s: float
    constraints: dict[str, float] = field(default_factory=dict)

    @property
    def average_bits(self) -> float:
        return FP32_BITS * self.packed_bytes / self.fp32_bytes


def packed_bytes(params: Mapping[str, int], bits: Mapping[str, int]) -> float:
    """Sum over layers of parameters x bits / 8."""
    return sum(params[name] * bits[name] / 8 for name in bits)


def _check_candidates(candidates: Sequence[int]) -> tuple[int, ...]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be a sequence of ints, got {candidates!r}")
    if not candidates:
        raise ValueError("candidates is empty: give at least one bit width, e.g. (2, 3, 4, 8)")
    # Each one checked before sorting: [4, "8"] would otherwise fail in sorted() with a TypeError
    # that names neither the argument nor the value.
    for b in candidates:
        if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(
                f"candidate bit width {b!r} is invalid: ints in {MIN_BITS}..{MAX_BITS}"
            )
    return tuple(sorted(set(candidates)))


def _check_fixed(fixed: Mapping[str, int] | None) -> dict[str, int]:
    if fixed is not None and not isinstance(fixed, Mapping):
        raise TypeError(
            f"fixed must be a mapping of layer name -> bits (e.g. {{'conv1': 8}}), got "
            f"{type(fixed).__name__} {fixed!r}"
        )
    return dict(fixed or {})


def allocate(
    sensitivities: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    budget: Budget,
    candidates: Sequence[int] = (2, 3, 4, 8),
    macs: Mapping[str, int] | None = None,
    act_bits: int = 8,
    latency_table: Mapping[str, Mapping[int, float]] | None = None,
    fixed: Mapping[str, int] | None = None,
) -> Allocation:
    """Per-layer weight bits minimizing the total sensitivity under `budget` (exact MILP).

    sensitivities: layer -> {bits: sensitivity} for every candidate; sizes: layer -> number of
    weight parameters; macs: layer -> multiply-accumulates per sample (needed for a bops budget);
    latency_table: layer -> {bits: ms} (needed for a latency budget); fixed: layer -> bits
    that the solver must keep (e.g. {"conv1": 8}).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be an edgequant.Budget, got {type(budget).__name__}")
    cands = _check_candidates(candidates)
    layers = list(sensitivities)
    if not layers:
        raise ValueError("sensitivities is empty: no layer to allocate bits to")
    fixed = _check_fixed(fixed)
    _check_tables(sensitivities, sizes, budget, cands, layers, fixed, macs, latency_table)
    nl, nb = len(layers), len(cands)
    cost = np.array([float(sensitivities[n][b]) for n in layers for b in cands])
    params = np.array([sizes[n] for n in layers], dtype=np.float64)
    size_row = np.array([sizes[n] * b / 8 for n in layers for b in cands])
    fp32_bytes = float(params.sum() * FP32_BITS / 8)

    bops_row = None
    if macs is not None:
        bops_row = np.array([macs[n] * b * act_bits for n in layers for b in cands], float)
    lat_row = None
    if latency_table is not None:
        lat_row = np.array([latency_table[n][b] for n in layers for b in cands], float)
    limits = _limits(budget, size_row, fp32_bytes, bops_row, lat_row)

    lb = np.zeros(nl * nb)
    ub = _fixed_bounds(layers, cands, fixed)
    rows, lower, upper = _constraints(limits, ub, nl, nb, cands, fixed, fp32_bytes)

    start = time.perf_counter()
    result = milp(
        c=cost,
        constraints=LinearConstraint(np.vstack(rows), np.array(lower), np.array(upper)),
        integrality=np.ones(nl * nb),
        bounds=Bounds(lb, ub),
    )
    solver_s = time.perf_counter() - start
    if result.status != 0 or result.x is None:
        # Each bound alone is feasible (checked above); together they may not be.
        raise ValueError(
            f"no bit allocation meets {budget} with candidates {list(cands)} "
            f"(scipy milp status {result.status}: {result.message})"
        )
    x = np.round(result.x).reshape(nl, nb)
    bits = {n: cands[int(np.argmax(x[li]))] for li, n in enumerate(layers)}
    chosen = np.round(result.x)
    packed = float(size_row @ chosen)
    constraints: dict[str, Any] = {label: limit for label, _, limit in limits}
    return Allocation(
        bits=bits,
        objective=float(cost @ chosen),
        packed_bytes=packed,
        fp32_bytes=fp32_bytes,
        bops=float(bops_row @ chosen) if bops_row is not None else None,
        latency_ms=float(lat_row @ chosen) if lat_row is not None else None,
        solver_s=solver_s,
        constraints=constraints,
    )


def _check_tables(
    sensitivities: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    budget: Budget,
    cands: tuple[int, ...],
    layers: list[str],
    fixed: Mapping[str, int],
    macs: Mapping[str, int] | None,
    latency_table: Mapping[str, Mapping[int, float]] | None,
) -> None:
    """Every layer has a finite sensitivity at every candidate and a size; fixed layers and
    widths exist; a bops or latency budget has its table for every layer."""
    for name in layers:
        row = sensitivities[name]
        missing = [b for b in cands if b not in row]
        if missing:
            raise ValueError(f"layer {name!r}: no sensitivity for bit widths {missing}")
        for b in cands:
            if not math.isfinite(float(row[b])):
                raise ValueError(f"layer {name!r}: sensitivity at {b} bits is {row[b]!r}")
        if name not in sizes:
            raise ValueError(f"layer {name!r}: no size (number of weight parameters) in sizes")
        if isinstance(sizes[name], bool) or not isinstance(sizes[name], int) or sizes[name] < 1:
            raise ValueError(f"layer {name!r}: size must be a positive int, got {sizes[name]!r}")
    for name, b in fixed.items():
        if name not in sensitivities:
            raise ValueError(f"fixed names layer {name!r}, which has no sensitivity")
        if b not in cands:
            raise ValueError(f"fixed[{name!r}]={b} is not a candidate ({list(cands)})")
    if budget.bops is not None:
        if macs is None:
            raise ValueError("a bops budget needs macs= (layer -> MACs per sample)")
        absent = [n for n in layers if n not in macs]
        if absent:
            raise ValueError(f"macs has no entry for layers {absent[:5]}")
    if budget.latency_ms is not None:
        if latency_table is None:
            raise ValueError(
                "a latency_ms budget needs latency_table= (layer -> {bits: ms}), measured on the "
                "target runtime: latency does not follow from bit widths alone (ONNX Runtime runs "
                "2-, 3- and 4-bit weights through the same kernels as 8-bit ones)"
            )
        for n in layers:
            lat = latency_table.get(n)
            if lat is None or any(b not in lat for b in cands):
                raise ValueError(f"latency_table has no entry for layer {n!r} at every candidate")


def _limits(
    budget: Budget,
    size_row: Any,
    fp32_bytes: float,
    bops_row: Any | None,
    lat_row: Any | None,
) -> list[tuple[str, Any, float]]:
    """Each bounded resource of the budget: (label, its row over the (layer, width) choices,
    its limit)."""
    limits: list[tuple[str, Any, float]] = []
    if budget.size_bytes is not None:
        limits.append(("size_bytes", size_row, float(budget.size_bytes)))
    if budget.size_ratio is not None:
        limits.append(("size_ratio", size_row, float(budget.size_ratio) * fp32_bytes))
    if budget.bops is not None:
        assert bops_row is not None
        limits.append(("bops", bops_row, float(budget.bops)))
    if budget.latency_ms is not None:
        assert lat_row is not None
        limits.append(("latency_ms", lat_row, float(budget.latency_ms)))
    return limits


def _fixed_bounds(layers: list[str], cands: tuple[int, ...], fixed: Mapping[str, int]) -> Any:
    """Upper bounds of the (layer, width) choices: 1, but 0 for every width of a fixed layer
    other than its own."""
    nb = len(cands)
    ub = np.ones(len(layers) * nb)
    for name, b in fixed.items():
        li, bi = layers.index(name), cands.index(b)
        for bj in range(nb):
            ub[li * nb + bj] = 1.0 if bj == bi else 0.0
    return ub


def _constraints(
    limits: list[tuple[str, Any, float]],
    ub: Any,
    nl: int,
    nb: int,
    cands: tuple[int, ...],
    fixed: Mapping[str, int],
    fp32_bytes: float,
) -> tuple[list[Any], list[float], list[float]]:
    """The program's rows with their lower and upper bounds: exactly one width per layer, then
    each resource under its limit (each checked feasible on its own first)."""
    index = {(li, bi): li * nb + bi for li in range(nl) for bi in range(nb)}
    rows: list[np.ndarray] = []
    upper: list[float] = []
    lower: list[float] = []
    for li in range(nl):  # exactly one bit width per layer
        one_hot = np.zeros(nl * nb)
        one_hot[[index[(li, bi)] for bi in range(nb)]] = 1
        rows.append(one_hot)
        lower.append(1)
        upper.append(1)
    for label, resource, limit in limits:
        # The smallest value the resource can take (each layer at its cheapest allowed width).
        least = sum(
            min(resource[index[(li, bi)]] for bi in range(nb) if ub[index[(li, bi)]] > 0)
            for li in range(nl)
        )
        _check_feasible(label, limit, least, cands, fixed, fp32_bytes)
        rows.append(resource)
        lower.append(-np.inf)
        upper.append(limit)
    return rows, lower, upper


def _check_feasible(
    label: str,
    limit: float,
    least: float,
    cands: tuple[int, ...],
    fixed: Mapping[str, int],
    fp32_bytes: float,
) -> None:
    """ValueError naming the bound when even the cheapest allowed plan is over it."""
    if least <= limit * (1 + 1e-12):
        return
    if label in ("size_bytes", "size_ratio"):
        raise ValueError(
            f"Budget {label} is infeasible: it allows {limit:,.0f} packed bytes, but the "
            f"smallest achievable size with candidates {list(cands)}"
            f"{' and fixed ' + str(fixed) if fixed else ''} is {least:,.0f} bytes "
            f"(size_ratio {least / fp32_bytes:.4f}, "
            f"{FP32_BITS * least / fp32_bytes:.2f} bits per weight)"
        )
    raise ValueError(
        f"Budget {label}={limit:g} is infeasible: the smallest achievable value with "
        f"candidates {list(cands)} is {least:g}"
    )
