"""check/result.py: what eq.check returns: a row per op the target cannot run in integer, with
the action for it."""

from __future__ import annotations

import pytest
from toys import relu_mlp  # tests/toys.py

import edgequant as eq
from edgequant.check import KEEP_FLOAT, REFUSE, REMOVE, REPLACE
from edgequant.check.result import CheckResult, op_row, target_spec
from edgequant.recipe import Recipe


def test_check_with_a_recipe_as_target_says_a_name_is_needed() -> None:
    with pytest.raises(TypeError, match=r"target must be a target name.*'onnxruntime'.*got Recipe"):
        eq.check(relu_mlp(8, 12, 12, 4), Recipe.preset("w8a8"))  # type: ignore[arg-type]


def test_each_op_gets_the_action_its_target_allows() -> None:
    assert op_row("n", "gelu", False, "onnxruntime", False).action == KEEP_FLOAT
    assert op_row("n", "softmax", True, "mcu-int8", True).action == REMOVE
    assert op_row("n", "softmax", True, "mcu-int8", False).action != REMOVE
    assert op_row("n", "gelu", True, "mcu-int8", False).action == REPLACE
    row = op_row("n", "Mystery", True, "mcu-int8", False)
    assert row.action == REFUSE and "no integer kernel known" in row.choice
    result = CheckResult("mcu-int8", True, integer_ops={"conv": 2})
    assert result.ok and "OK" in result.format() and "conv x2" in result.format()
    result.rows.append(row)
    assert not result.ok and result.to_dict()["ok"] is False and "NOT OK" in str(result)
    with pytest.raises(ValueError, match="unknown target 'gpu'"):
        target_spec("gpu")
