"""The zoo (tests/zoo.py) through the edge exporters (issue 29): every model x {export_tflite for
mcu-int8 and tflite-int8, export_executorch for mcu-int8 and executorch} exports and verifies in
its runtime (TFLite Micro bit for bit; ExecuTorch against the simulation), or is refused before
any work with the op, the layer or the target named; none fails verification, none fails after
conversion or lowering began.

The full matrix (~60 exports, ~9 minutes on 2 cores) is marked slow; the default run keeps three
ExecuTorch cases the fixes of stop 37 are about (nearest upsampling with a concatenation skip,
an adaptive max pool, LayerNorm) and the refusals, which cost nothing (the .tflite side of the
fixes: tests/export/test_tflite.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from zoo import FULLY_INTEGER_REFUSALS, ZOO  # tests/zoo.py

import edgequant as eq
import edgequant.export.executorch as executorch
import edgequant.export.tflite as tflite

pytest.importorskip("ai_edge_litert")
pytest.importorskip("executorch")

# (format, target): the four ways a zoo model reaches an edge file.
ROUTES = (
    ("tflite", "mcu-int8"),
    ("tflite", "tflite-int8"),
    ("pte", "mcu-int8"),
    ("pte", "executorch"),
)


def expected_refusal(model: str, fmt: str, target: str) -> tuple[str, str] | None:
    """(stage, pattern) of the refusal a case must meet, None where it must export: 'quantize'
    refusals come from eq.quantize before calibration, 'export' ones before any conversion."""
    if target == "mcu-int8" and model in FULLY_INTEGER_REFUSALS:
        return "quantize", FULLY_INTEGER_REFUSALS[model]
    if model == "tiny_bert":  # integer token ids: edge runtimes here take float32 inputs
        return "export", r"example_inputs\[0\] must be float32, got torch.int64"
    if fmt == "tflite" and target == "tflite-int8":
        # The logits stay float on tflite-int8: named with their op and layer, as is any other
        # float op (tests/export/test_tflite_float.py).
        return "export", (
            r"target 'tflite-int8', which leaves float ops .*: aten\.\w+ \((layer '[\w.]+'|the "
            r"top level)\) (writes the model's output|feeds aten\.\w+ .*) in float.*"
            r"for_target\('mcu-int8'\)"
        )
    return None


def _no_work(*_: Any, **__: Any) -> Any:
    raise AssertionError("a refused case reached conversion or lowering")


def run_edge_case(model_name: str, fmt: str, target: str, tmp_path: Path, monkeypatch: Any) -> None:
    model, data = ZOO[model_name]()
    recipe = eq.Recipe.preset("w8a8").for_target(target)
    refusal = expected_refusal(model_name, fmt, target)
    if refusal is not None and refusal[0] == "quantize":
        with pytest.raises(ValueError, match=refusal[1]):
            eq.quantize(model, recipe, data, method="static")
        return
    qmodel = eq.quantize(model, recipe, data, method="static")
    first = data[0]
    example = tuple(first.values()) if isinstance(first, dict) else first[:1]
    path = tmp_path / f"m.{fmt}"
    export = eq.export_tflite if fmt == "tflite" else eq.export_executorch
    if refusal is not None:
        monkeypatch.setattr(tflite, "convert_program", _no_work)
        monkeypatch.setattr(executorch, "lower_to_executorch", _no_work)
        with pytest.raises((eq.ExportError, TypeError), match=refusal[1]):
            export(qmodel, path, example, verify_data=data)
        assert not path.exists()
        return
    info = export(qmodel, path, example, verify_data=data)
    v = info.verification
    assert v.passed and path.is_file()
    if fmt == "tflite":
        assert v.bit_exact == 1.0 and v.max_step_difference == 0
    else:
        assert v.sqnr_db is not None and v.sqnr_db >= 30.0


def _id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


ALL = [(name, fmt, target) for name in ZOO for fmt, target in ROUTES]
FAST = [
    ("concat_upsample", "pte", "executorch"),
    ("adaptive_max_pool1d", "pte", "executorch"),
    ("layernorm_gelu", "pte", "executorch"),
    ("depthwise_separable", "tflite", "tflite-int8"),
    ("squeeze_excite", "tflite", "mcu-int8"),
] + [c for c in ALL if c[0] == "tiny_bert" and c[2] != "mcu-int8"]


@pytest.mark.parametrize("case", FAST, ids=_id)
def test_zoo_edge(case: tuple[str, str, str], tmp_path: Path, monkeypatch: Any) -> None:
    torch.manual_seed(0)
    run_edge_case(*case, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in ALL if c not in FAST], ids=_id)
def test_zoo_edge_full_matrix(case: tuple[str, str, str], tmp_path: Path, monkeypatch: Any) -> None:
    torch.manual_seed(0)
    run_edge_case(*case, tmp_path, monkeypatch)
