"""The zoo (tests/zoo.py) through every method and every target: each combination exports and
verifies in ONNX Runtime, or is refused before any work with a ValueError naming the op and the
layer (DESIGN §3.1: the exporter never writes a model that does not verify; issue 27: the
defaults work on any model).

The full matrix (models x targets x methods, 180 cases, ~6 minutes on 2 cores: an export is
~2.5 s of torch.export) is marked slow; the default run takes every model through static and
through dynamic or weight-only quantization, the targets in turn, and through every method for
the fully integer target, whose refusals are the strictest (about 30 exports).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from zoo import FULLY_INTEGER_REFUSALS, ZOO  # tests/zoo.py

import edgequant as eq
from edgequant.targets import TARGETS

pytest.importorskip("onnxruntime")

METHODS = ("static", "dynamic", "weight_only")

# Combinations that are refused, and what the refusal must name: (method, target) -> pattern
# per model; None: the combination must export and verify.
_FULLY_INTEGER_OPS = FULLY_INTEGER_REFUSALS
# Dynamic quantization covers Linear layers only: a model without one has nothing to quantize.
_NO_LINEAR = {"concat_upsample": r"no quantizable layer \(Linear, Embedding\).*enc: dynamic"}


def expected_refusal(model: str, target: str, method: str) -> str | None:
    if TARGETS[target].fully_integer:
        if method != "static":
            return rf"method '{method}' .* target 'mcu-int8' needs a fully integer graph: layer '"
        return _FULLY_INTEGER_OPS.get(model)
    if method == "dynamic":
        return _NO_LINEAR.get(model)
    return None


def run_case(model_name: str, target: str, method: str, tmp_path: Path) -> None:
    model, data = ZOO[model_name]()
    recipe = eq.Recipe.preset("w8a8").for_target(target)
    refusal = expected_refusal(model_name, target, method)
    if refusal is not None:
        calls = 0

        def counting() -> Any:  # the refusal comes before calibration: at most one batch read
            nonlocal calls
            for batch in data:
                calls += 1
                yield batch

        with pytest.raises(ValueError, match=refusal):
            eq.quantize(model, recipe, counting(), method=method)
        assert calls <= 1
        return
    qmodel = eq.quantize(model, recipe, data, method=method)
    info = eq.export_onnx(qmodel, tmp_path / "m.onnx", data[0], verify_data=data[1:])
    assert info.verification.passed
    # Never by a loosened tolerance: the defaults (30 dB, 99.5 % top-1) held.
    assert info.verification.required_sqnr_db >= 30.0 or info.verification.floor_sqnr_db < 36
    if TARGETS[target].fully_integer:
        assert info.fully_integer is True


def _default_cases() -> list[tuple[str, str, str]]:
    """Every model static (targets in turn) and under dynamic or weight-only (in turn), and
    through every method for the fully integer target (refusals cost nothing)."""
    others = [t for t, spec in TARGETS.items() if not spec.fully_integer]
    integer = [t for t, spec in TARGETS.items() if spec.fully_integer]
    cases = []
    for i, name in enumerate(ZOO):
        cases.append((name, others[i % len(others)], "static"))
        cases.append((name, others[(i + 1) % len(others)], METHODS[1 + i % 2]))
        cases.extend((name, target, method) for target in integer for method in METHODS)
    return cases


def _case_id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


@pytest.mark.parametrize("case", _default_cases(), ids=_case_id)
def test_zoo(case: tuple[str, str, str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    run_case(*case, tmp_path)


_ALL = [(n, t, m) for n in ZOO for t in TARGETS for m in METHODS]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in _ALL if c not in set(_default_cases())], ids=_case_id)
def test_zoo_full_matrix(case: tuple[str, str, str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    run_case(*case, tmp_path)


def test_refusals_name_the_op_and_the_layer() -> None:
    """The patterns above are specific: each names an op and a module path of its model."""
    for model, pattern in _FULLY_INTEGER_OPS.items():
        assert model in ZOO or model == "tiny_bert"
        assert re.search(r"op '[\w.]+' at '[\w.]+'", pattern.replace("\\", ""))
