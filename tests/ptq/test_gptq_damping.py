"""GPTQ's damping rule (ptq/gptq.py damping): larger where GPTQ rounds towards the float target,
GPTQ's own elsewhere, the recipe's when it gives one; recorded in the pipeline and passed to the
rounding."""

from __future__ import annotations

from typing import Any

import pytest
from toys import Chain, quantize_chain  # tests/toys.py

import edgequant as eq
from edgequant.ptq import gptq
from edgequant.ptq import static as S


def test_damping_rule() -> None:
    assert gptq.FLOAT_TARGET_DAMP > gptq.GPTQ_DAMP
    assert gptq.damping(None, True) == (gptq.FLOAT_TARGET_DAMP, gptq.FLOAT_TARGET_DAMP_WHY)
    assert gptq.damping(None, False)[0] == gptq.GPTQ_DAMP
    assert gptq.damping(0.05, True) == (0.05, "recipe")


@pytest.mark.parametrize(
    ("preset", "changes", "damp", "why"),
    [
        ("w3a8", {}, gptq.FLOAT_TARGET_DAMP, gptq.FLOAT_TARGET_DAMP_WHY),  # float target
        ("w4a8", {}, gptq.GPTQ_DAMP, None),  # own target: GPTQ's damping, as before
        ("w3a8", {"gptq_damp": 0.2}, 0.2, "recipe"),
        ("w4a8", {"rounding_target": "float"}, gptq.FLOAT_TARGET_DAMP, None),
    ],
)
def test_pipeline_records_and_passes_the_damping(
    preset: str, changes: dict[str, Any], damp: float, why: str | None, monkeypatch
) -> None:
    calls: list[dict[str, Any]] = []

    def spy(layer: Any, inputs: Any, targets: Any = None, **options: Any) -> None:
        calls.append(options)
        gptq.round_gptq(layer, inputs, targets, **options)

    monkeypatch.setitem(S.ROUNDERS, "gptq", spy)
    q = quantize_chain(Chain().eval(), preset, **changes)
    pipeline = q.quant_info["pipeline"]
    assert pipeline["rounding"] == "gptq"
    assert pipeline["gptq_damp"] == damp
    assert "gptq_damp" in pipeline["reasons"]
    if why is not None:
        assert pipeline["reasons"]["gptq_damp"] == why
    assert calls and all(c == {"damp": damp} for c in calls)


def test_no_damping_without_gptq() -> None:
    pipeline = quantize_chain(Chain().eval(), "w8a8").quant_info["pipeline"]
    assert pipeline["rounding"] == "nearest" and pipeline["gptq_damp"] is None


def test_recipe_switch_validates_and_round_trips() -> None:
    recipe = eq.Recipe.preset("w3a8").replace(gptq_damp=0.05)
    assert eq.Recipe.from_dict(recipe.to_dict()).gptq_damp == 0.05
    assert eq.Recipe.from_dict({"name": "x"}).gptq_damp is None
    for bad in (0, -0.1, True, "auto"):
        with pytest.raises(ValueError, match="gptq_damp"):
            eq.Recipe.preset("w3a8").replace(gptq_damp=bad)
