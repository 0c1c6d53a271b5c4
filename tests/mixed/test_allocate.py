"""allocate: the integer program against brute force, Budget validation, infeasible budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgequant import Budget
from edgequant.mixed import allocate

CANDS = (2, 3, 4, 8)


def _instance(seed: int, layers: int = 5) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(layers)]
    sizes = {n: int(rng.integers(50, 5000)) for n in names}
    macs = {n: int(rng.integers(1_000, 100_000)) for n in names}
    sens = {}
    for n in names:
        # Sensitivity falls with bits, as measured ones do (roughly 4x per bit).
        scale = float(rng.uniform(0.01, 10))
        sens[n] = {b: scale * 4.0 ** (-b) * float(rng.uniform(0.5, 2)) for b in CANDS}
    return sens, sizes, macs


def _brute_force(sens, sizes, macs, size_limit=None, bops_limit=None, act_bits=8):
    names = list(sens)
    best = (np.inf, None)
    for combo in itertools.product(CANDS, repeat=len(names)):
        size = sum(sizes[n] * b / 8 for n, b in zip(names, combo, strict=True))
        bops = sum(macs[n] * b * act_bits for n, b in zip(names, combo, strict=True))
        if size_limit is not None and size > size_limit:
            continue
        if bops_limit is not None and bops > bops_limit:
            continue
        cost = sum(sens[n][b] for n, b in zip(names, combo, strict=True))
        if cost < best[0]:
            best = (cost, dict(zip(names, combo, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_matches_brute_force_under_a_size_budget(seed: int) -> None:
    sens, sizes, macs = _instance(seed)
    total = sum(sizes.values())
    limit = total * (2.3 + 0.3 * seed) / 8  # 2.3 .. 3.8 bits on average
    cost, bits = _brute_force(sens, sizes, macs, size_limit=limit)
    got = allocate(sens, sizes, Budget(size_bytes=limit), CANDS)
    assert got.objective == pytest.approx(cost, rel=1e-9)
    assert got.packed_bytes <= limit
    assert sum(sens[n][b] for n, b in got.bits.items()) == pytest.approx(cost, rel=1e-9)
    assert got.bits == bits  # unique optimum with continuous random costs


@pytest.mark.parametrize("seed", range(3))
def test_milp_matches_brute_force_under_size_and_bops(seed: int) -> None:
    sens, sizes, macs = _instance(100 + seed)
    total = sum(sizes.values())
    bops_all8 = sum(m * 8 * 8 for m in macs.values())
    size_limit, bops_limit = total * 3.5 / 8, bops_all8 * 0.4
    cost, bits = _brute_force(sens, sizes, macs, size_limit, bops_limit)
    got = allocate(sens, sizes, Budget(size_bytes=size_limit, bops=bops_limit), CANDS, macs=macs)
    assert got.objective == pytest.approx(cost, rel=1e-9)
    assert got.bits == bits
    assert got.bops is not None and got.bops <= bops_limit


def test_size_ratio_is_relative_to_fp32_weights() -> None:
    sens, sizes, _ = _instance(7)
    total = sum(sizes.values())
    got = allocate(sens, sizes, Budget.average_bits(3.0), CANDS)
    assert got.packed_bytes <= total * 3.0 / 8 + 1e-9
    assert got.average_bits <= 3.0 + 1e-9
    assert got.fp32_bytes == total * 4


def test_a_generous_budget_gives_every_layer_the_widest_width() -> None:
    sens, sizes, _ = _instance(8)
    got = allocate(sens, sizes, Budget(size_ratio=0.25), CANDS)
    assert set(got.bits.values()) == {8}


def test_fixed_layers_keep_their_width() -> None:
    sens, sizes, _ = _instance(9)
    total = sum(sizes.values())
    got = allocate(sens, sizes, Budget(size_bytes=total * 3 / 8), CANDS, fixed={"l0": 8})
    assert got.bits["l0"] == 8
    with pytest.raises(ValueError, match="not a candidate"):
        allocate(sens, sizes, Budget(size_bytes=total), CANDS, fixed={"l0": 5})
    with pytest.raises(ValueError, match="no sensitivity"):
        allocate(sens, sizes, Budget(size_bytes=total), CANDS, fixed={"nope": 8})


def test_infeasible_size_names_the_smallest_achievable_size() -> None:
    sens, sizes, _ = _instance(10)
    smallest = sum(sizes.values()) * 2 / 8
    with pytest.raises(ValueError, match=f"smallest achievable size .* is {smallest:,.0f} bytes"):
        allocate(sens, sizes, Budget(size_bytes=smallest * 0.9), CANDS)
    with pytest.raises(ValueError, match="size_ratio is infeasible"):
        allocate(sens, sizes, Budget(size_ratio=1.5 / 32), CANDS)


def test_latency_budget_needs_a_table_and_uses_it() -> None:
    sens, sizes, _ = _instance(11, layers=4)
    with pytest.raises(ValueError, match="latency_table"):
        allocate(sens, sizes, Budget(latency_ms=1.0), CANDS)
    table = {n: {b: 0.1 * b for b in CANDS} for n in sens}
    got = allocate(sens, sizes, Budget(latency_ms=4 * 0.3), CANDS, latency_table=table)
    assert got.latency_ms is not None and got.latency_ms <= 1.2 + 1e-9
    # Brute force on latency alone.
    best = min(
        (
            sum(sens[n][b] for n, b in zip(sens, combo, strict=True)),
            combo,
        )
        for combo in itertools.product(CANDS, repeat=4)
        if sum(0.1 * b for b in combo) <= 1.2 + 1e-12
    )
    assert got.objective == pytest.approx(best[0], rel=1e-9)


def test_bops_budget_needs_macs() -> None:
    sens, sizes, _ = _instance(12)
    with pytest.raises(ValueError, match="macs="):
        allocate(sens, sizes, Budget(bops=1e9), CANDS)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "at least one bound"),
        ({"size_bytes": -1}, ValueError, "size_bytes must be a positive"),
        ({"size_bytes": 0}, ValueError, "size_bytes must be a positive"),
        ({"bops": float("nan")}, ValueError, "bops must be a positive finite"),
        ({"latency_ms": float("inf")}, ValueError, "latency_ms must be a positive finite"),
        ({"size_ratio": 1.5}, ValueError, "above 1"),
        ({"size_bytes": "1000"}, TypeError, "size_bytes must be a number"),
        ({"size_bytes": True}, TypeError, "size_bytes must be a number"),
    ],
)
def test_budget_validation(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Budget(**kwargs)


def test_budget_is_frozen_and_prints_its_bounds() -> None:
    b = Budget(size_bytes=1000, bops=5e6)
    assert str(b) == "Budget(size_bytes=1000, bops=5e+06)"
    with pytest.raises(AttributeError):
        b.size_bytes = 5  # type: ignore[misc]
    assert Budget.average_bits(2.5) == Budget(size_ratio=2.5 / 32)
    with pytest.raises(ValueError, match="average bits"):
        Budget.average_bits(0)


def test_bad_arguments_name_the_layer() -> None:
    sens, sizes, _ = _instance(13)
    with pytest.raises(ValueError, match="layer 'l1': no sensitivity for bit widths \\[8\\]"):
        allocate({**sens, "l1": {2: 1.0, 3: 0.5, 4: 0.1}}, sizes, Budget(size_ratio=0.1))
    with pytest.raises(ValueError, match="layer 'l2': no size"):
        allocate(sens, {k: v for k, v in sizes.items() if k != "l2"}, Budget(size_ratio=0.1))
    with pytest.raises(ValueError, match="candidate bit width 1"):
        allocate(sens, sizes, Budget(size_ratio=0.1), (1, 2))
    with pytest.raises(TypeError, match="edgequant.Budget"):
        allocate(sens, sizes, {"size_ratio": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sensitivities is empty"):
        allocate({}, sizes, Budget(size_ratio=0.1))
