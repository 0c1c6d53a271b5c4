"""GPTQ's damping rule (ptq/gptq.py damping): larger where the weights have several widths of <=
4 bits (mixed precision), GPTQ's own elsewhere, the recipe's when it gives one; recorded in the
pipeline and passed to the rounding."""

from __future__ import annotations

from typing import Any

import pytest
from toys import Chain, quantize_chain  # tests/toys.py

import edgequant as eq
from edgequant.ptq import gptq
from edgequant.ptq import static as S
from edgequant.spec import LayerOverride, weight_spec

# conv2 at 2 bits, the first and last layers at 3: two weight widths of <= 4 bits (the presets'
# 8-bit first and last layers, and 7-bit ones of reduce_range, do not count).
MIXED: dict[str, Any] = {
    "first_last_bits": None,
    "overrides": (LayerOverride(pattern="conv2", weight=weight_spec(2)),),
}


def test_damping_rule() -> None:
    assert gptq.MIXED_DAMP > gptq.GPTQ_DAMP
    mixed = quantize_chain(Chain().eval(), "w3a8", **MIXED, rounding="nearest")
    assert gptq.damping(None, mixed) == (gptq.MIXED_DAMP, gptq.MIXED_DAMP_WHY)
    for preset in ("w2a8", "w3a8", "w4a8"):  # one width: GPTQ's own
        uniform = quantize_chain(Chain().eval(), preset, rounding="nearest")
        assert gptq.damping(None, uniform)[0] == gptq.GPTQ_DAMP
    assert gptq.damping(0.05, mixed) == (0.05, "recipe")


@pytest.mark.parametrize(
    ("preset", "changes", "damp", "why"),
    [
        ("w3a8", MIXED, gptq.MIXED_DAMP, gptq.MIXED_DAMP_WHY),
        ("w2a8", {}, gptq.GPTQ_DAMP, None),  # one width: GPTQ's own damping, as before
        ("w3a8", {}, gptq.GPTQ_DAMP, None),
        ("w4a8", {}, gptq.GPTQ_DAMP, None),
        ("w3a8", {"gptq_damp": 0.2}, 0.2, "recipe"),
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
