"""Bad input to eq.compare and eq.Report fails at the boundary with a message naming the argument
and the value, before any model is exported, and a report that cannot be rendered leaves an
earlier report in its folder whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from edgequant.recipe import Recipe
from edgequant.report.compare import Report, Run, compare

pytest.importorskip("onnxruntime")


def _toy() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return model, list(torch.randn(64, 16).split(16))


def _const(value: Any):  # type: ignore[no-untyped-def]
    return lambda predict: value


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> None:
    def exporter_reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("compare went on to export")

    monkeypatch.setattr(torch.onnx, "export", exporter_reached)


RUNS = [Run("static-w8a8", "static", Recipe.preset("w8a8"))]


def test_example_inputs_the_model_cannot_run(no_export: None) -> None:
    # Was: torch.export's TorchExportError from the FP32 baseline export.
    model, calib = _toy()
    with pytest.raises(
        ValueError,
        match=r"calib_data\[0\] \(the default example_inputs\) \(a Tensor \(8, 15\) float32\) "
        r"do not run through the model: layer '0' \(Linear\)",
    ):
        compare(model, [torch.randn(8, 15)], _const(1.0), runs=RUNS)
    with pytest.raises(ValueError, match=r"^example_inputs \(a Tensor \(4, 15\) float32\)"):
        compare(model, calib, _const(1.0), example_inputs=torch.randn(4, 15), runs=RUNS)


def test_data_given_as_a_tensor_or_none(no_export: None) -> None:
    # Was: rows taken as batches (ONNX Runtime's "Invalid rank"); "'NoneType' is not iterable".
    model, calib = _toy()
    with pytest.raises(TypeError, match=r"calib_data must be an iterable of batches.*\(64, 16\)"):
        compare(model, torch.randn(64, 16), _const(1.0), runs=RUNS)
    with pytest.raises(TypeError, match="calib_data must be an iterable of batches.*NoneType"):
        compare(model, None, _const(1.0), runs=RUNS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"train_data must be an iterable .*\(32, 16\)"):
        compare(model, calib, _const(1.0), runs=RUNS, train_data=torch.randn(32, 16))


def test_eval_fn_returning_nan_or_none(tmp_path: Path) -> None:
    # Was: NaN recorded as the baseline ("the best was ... at nan"); None: float()'s TypeError.
    model, calib = _toy()
    with pytest.raises(ValueError, match="eval_fn returned nan for the FP32 baseline"):
        compare(model, calib, _const(float("nan")), runs=RUNS)
    with pytest.raises(TypeError, match="eval_fn must return a number .* NoneType None"):
        compare(model, calib, _const(None), runs=RUNS)


def test_recipes_as_one_string_and_runs_of_names(no_export: None) -> None:
    # Was: "unknown preset 'w'" (the string iterated); AttributeError "'str' ... 'name'".
    model, calib = _toy()
    with pytest.raises(TypeError, match=r"got the single 'w8a8': pass \['w8a8'\]"):
        compare(model, calib, _const(1.0), recipes="w8a8")
    with pytest.raises(TypeError, match="runs must hold Run objects, got str 'w8a8'"):
        compare(model, calib, _const(1.0), runs=["w8a8"])  # type: ignore[list-item]


def test_tolerance_text_and_progress_flag(no_export: None) -> None:
    # Was: "'<=' not supported between 'int' and 'str'"; "'bool' object is not callable".
    model, calib = _toy()
    with pytest.raises(TypeError, match=r"tolerance must be a number in \[0, 1\), got '0.01'"):
        compare(model, calib, _const(1.0), runs=RUNS, tolerance="0.01")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress must be a callable .* got True"):
        compare(model, calib, _const(1.0), runs=RUNS, progress=True)  # type: ignore[arg-type]


def test_out_dir_that_is_a_file(tmp_path: Path, no_export: None) -> None:
    # Was: NotADirectoryError on out_dir/models (compare), FileExistsError (Report.save).
    model, calib = _toy()
    afile = tmp_path / "report.html"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"out_dir '.*report.html' is a file, not a folder"):
        compare(model, calib, _const(1.0), runs=RUNS, out_dir=afile)
    with pytest.raises(ValueError, match=r"out_dir '.*report.html' is a file, not a folder"):
        Report({"runs": []}).save(afile)
    assert afile.read_text() == "x"


def test_save_of_unrenderable_results_leaves_the_old_report(tmp_path: Path) -> None:
    # Was: results.json replaced, then a KeyError, beside the old report.md and report.html.
    (tmp_path / "results.json").write_text('{"old": true}')
    (tmp_path / "report.md").write_text("old report")
    with pytest.raises(ValueError, match=r"Report.results lacks the keys \['task', 'metric'"):
        Report({"runs": []}).save(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]
