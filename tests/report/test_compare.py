"""eq.compare and the demo: isolation of failures, deployed metrics; bad
arguments to compare refused before any export work, naming the argument and the value.
Also covers report/runs.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from toys import relu_mlp  # tests/toys.py

from edgequant.recipe import Recipe
from edgequant.report.compare import Report, Run, compare, stderr_progress


def _toy() -> tuple[nn.Module, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = model(x).argmax(1)
    return (
        model,
        list(x[:128].split(32)),
        list(zip(x[128:].split(64), y[128:].split(64), strict=True)),
    )


def _accuracy(test):  # type: ignore[no-untyped-def]
    def metric(predict) -> float:  # type: ignore[no-untyped-def]
        correct = sum(int((predict(x).argmax(1) == y).sum()) for x, y in test)
        return correct / sum(int(y.shape[0]) for _, y in test)

    return metric


def _compare_toy(model, calib, test, runs, **options) -> Report:  # type: ignore[no-untyped-def]
    """compare on _toy()'s model and data: scored by _accuracy on `test`, verified on its
    inputs, calib[0] the example; `options` as compare takes them."""
    verify = [x for x, _ in test]
    return compare(
        model, calib, _accuracy(test), calib[0], runs=runs, verify_data=verify, **options
    )


def test_a_failing_method_is_reported_and_the_others_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, calib, test = _toy()
    runs = [
        Run("static-w8a8", "static", Recipe.preset("w8a8")),
        # dynamic quantization needs 8-bit weights: this run must fail, alone
        Run("dynamic-w4a8", "dynamic", Recipe.preset("w4a8")),
        Run("weight-only-w8", "weight_only", Recipe.preset("w8a8")),
    ]
    model.train()  # the caller's flags and weights must survive compare (STYLE §9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _compare_toy(model, calib, test, runs, out_dir=tmp_path, latency_runs=2)
    assert capsys.readouterr().err == ""  # no progress given: silent, bars included
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = {r["name"]: r for r in report.results["runs"]}
    assert (
        rows["dynamic-w4a8"]["status"] == "failed"
        and "8-bit weights" in rows["dynamic-w4a8"]["error"]
    )
    for name in ("static-w8a8", "weight-only-w8"):
        row = rows[name]
        assert row["status"] == "ok"
        # The labels are the FP32 model's own predictions: W8 keeps nearly all of them.
        assert row["metric_deployed"] >= 0.95
        assert Path(row["onnx"]).is_file() and row["size_bytes"] == Path(row["onnx"]).stat().st_size
        assert set(row["latency_ms"]) == {"bs1", "bs64"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["baseline"]["metric"] == pytest.approx(1.0)
    assert {"task", "metric", "baseline", "runs", "recommendation", "environment"} <= set(saved)
    text = (tmp_path / "report.md").read_text()
    assert "FAILED" in text and "Recommendation" in text


def test_qat_and_mixed_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, calib, test = _toy()
    runs = [
        Run("qat-w4a8", "static", Recipe.preset("w4a8"), family="qat", epochs=2),
        Run("mixed", "static", Recipe.preset("w4a8"), family="mixed", budget_ratio=0.15),
        Run("qat-no-data", "static", Recipe.preset("w8a8"), family="qat", epochs=1),
    ]
    train = [(x, model(x).argmax(1).detach()) for x in calib]
    report = _compare_toy(
        model, calib, test, runs[:2], train_data=train, latency_runs=2, progress=stderr_progress()
    )
    rows = {r["name"]: r for r in report.results["runs"]}
    qat = rows["qat-w4a8"]
    assert qat["status"] == "ok", qat.get("error")
    assert qat["labels_used"] is True and qat["family"] == "qat"
    # The epoch is chosen on the held-out batch of train_data (4 batches: the last one).
    selection = qat["selection"]
    assert selection["held_out_samples"] == 32 and selection["trained_on_samples"] == 96
    assert selection["against"] == "labels" and len(selection["heldout_top1"]) == 3
    assert 0 <= qat["kept_epoch"] <= 2 and f"epoch {qat['kept_epoch']}" in selection["why"]
    assert qat["samples_used"] > 128  # calibration plus the training data
    assert selection["why"] in report.to_markdown()
    # Progress on stderr for every long step: the bars of calibration, learned rounding,
    # sensitivity and QAT epochs, and a line for export, verification and latency.
    err = capsys.readouterr().err
    for step in (
        "calibrating",
        "weights (",
        "sensitivity",
        "QAT epoch 2/2",
        "qat-w4a8: exporting to ONNX and verifying in ONNX Runtime",
        "mixed: latency in ONNX Runtime",
    ):
        assert step in err, f"no progress for {step!r} in: {err[-3000:]}"
    mixed = rows["mixed"]
    assert mixed["status"] == "ok", mixed.get("error")
    assert set(mixed["mixed_bits"].values()) <= {2, 3, 4, 8}
    # Without training data a QAT run fails alone, with the reason.
    report = compare(model, calib, _accuracy(test), calib[0], runs=runs[2:], latency_runs=2)
    row = report.results["runs"][0]
    assert row["status"] == "failed" and "train_data" in row["error"]
    with pytest.raises(ValueError, match="epochs"):
        Run("q", "static", Recipe.preset("w8a8"), family="qat")
    with pytest.raises(ValueError, match="budget_ratio"):
        Run("m", "static", Recipe.preset("w8a8"), family="mixed")


def test_bad_arguments_are_named() -> None:
    model, calib, test = _toy()
    with pytest.raises(TypeError, match="model"):
        compare("not a model", calib, _accuracy(test), calib[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tolerance"):
        compare(model, calib, _accuracy(test), calib[0], tolerance=2.0)
    with pytest.raises(ValueError, match="empty"):
        compare(model, [], _accuracy(test), calib[0])
    dup = [
        Run("a", "static", Recipe.preset("w8a8")),
        Run("a", "weight_only", Recipe.preset("w8a8")),
    ]
    with pytest.raises(ValueError, match="unique"):
        compare(model, calib, _accuracy(test), calib[0], runs=dup)


def test_demo_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mnist1d")
    from edgequant.cli import main

    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    # --quiet: no progress line or bar from any step (training, PTQ, mixed, QAT), one line out.
    assert printed.err == ""
    assert printed.out.startswith("recommendation: ") and printed.out.count("\n") == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["baseline"]["metric"] >= 0.90
    static = next(r for r in results["runs"] if r["name"] == "ptq-static-w8a8")
    assert static["status"] == "ok"
    assert static["metric_deployed"] >= results["baseline"]["metric"] - 0.01
    assert results["recommendation"]["choice"] is not None
    rows = {r["name"]: r for r in results["runs"]}
    # QAT starts from the PTQ model and keeps an epoch only when it wins on held-out training
    # data beyond noise: never worse than PTQ at its bits.
    qat, ptq = rows["qat-w4a4"], rows["ptq-static-w4a4"]
    assert qat["status"] == "ok" and ptq["status"] == "ok"
    assert qat["metric_deployed"] >= ptq["metric_deployed"] - 0.002
    assert qat["selection"]["held_out_samples"] == 500  # every 7th of 35 batches of 100
    assert rows["mixed-w3avg-a8"]["status"] == "ok"


def _mlp_and_calib() -> tuple[nn.Module, list[torch.Tensor]]:
    model = relu_mlp(16, 32, 4)
    return model, list(torch.randn(64, 16).split(16))


def _const(value: Any):  # type: ignore[no-untyped-def]
    return lambda predict: value


RUNS = [Run("static-w8a8", "static", Recipe.preset("w8a8"))]


def test_example_inputs_the_model_cannot_run(no_export: None) -> None:
    # Was: torch.export's TorchExportError from the FP32 baseline export.
    model, calib = _mlp_and_calib()
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
    model, calib = _mlp_and_calib()
    with pytest.raises(TypeError, match=r"calib_data must be an iterable of batches.*\(64, 16\)"):
        compare(model, torch.randn(64, 16), _const(1.0), runs=RUNS)
    with pytest.raises(TypeError, match="calib_data must be an iterable of batches.*NoneType"):
        compare(model, None, _const(1.0), runs=RUNS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"train_data must be an iterable .*\(32, 16\)"):
        compare(model, calib, _const(1.0), runs=RUNS, train_data=torch.randn(32, 16))


def test_eval_fn_returning_nan_or_none(tmp_path: Path) -> None:
    # Was: NaN recorded as the baseline ("the best was ... at nan"); None: float()'s TypeError.
    model, calib = _mlp_and_calib()
    with pytest.raises(ValueError, match="eval_fn returned nan for the FP32 baseline"):
        compare(model, calib, _const(float("nan")), runs=RUNS)
    with pytest.raises(TypeError, match="eval_fn must return a number .* NoneType None"):
        compare(model, calib, _const(None), runs=RUNS)


def test_recipes_as_one_string_and_runs_of_names(no_export: None) -> None:
    # Was: "unknown preset 'w'" (the string iterated); AttributeError "'str' ... 'name'".
    model, calib = _mlp_and_calib()
    with pytest.raises(TypeError, match=r"got the single 'w8a8': pass \['w8a8'\]"):
        compare(model, calib, _const(1.0), recipes="w8a8")
    with pytest.raises(TypeError, match="runs must hold Run objects, got str 'w8a8'"):
        compare(model, calib, _const(1.0), runs=["w8a8"])  # type: ignore[list-item]


def test_tolerance_text_and_progress_flag(no_export: None) -> None:
    # Was: "'<=' not supported between 'int' and 'str'"; "'bool' object is not callable".
    model, calib = _mlp_and_calib()
    with pytest.raises(TypeError, match=r"tolerance must be a number in \[0, 1\), got '0.01'"):
        compare(model, calib, _const(1.0), runs=RUNS, tolerance="0.01")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress must be a callable .* got True"):
        compare(model, calib, _const(1.0), runs=RUNS, progress=True)  # type: ignore[arg-type]


def test_out_dir_that_is_a_file(tmp_path: Path, no_export: None) -> None:
    # Was: NotADirectoryError on out_dir/models (compare), FileExistsError (Report.save).
    model, calib = _mlp_and_calib()
    afile = tmp_path / "report.html"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"out_dir '.*report.html' is a file, not a folder"):
        compare(model, calib, _const(1.0), runs=RUNS, out_dir=afile)
    with pytest.raises(ValueError, match=r"out_dir '.*report.html' is a file, not a folder"):
        Report({"runs": []}).save(afile)
    assert afile.read_text() == "x"


def test_a_qat_run_starts_from_its_ptq_runs_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A QAT run whose recipe a PTQ run already quantized (weight-only, or static without
    SmoothQuant and splitting) starts from that model instead of quantizing again; one whose
    PTQ run smoothed (or that has none) quantizes its own start."""
    import edgequant.report.compare as compare_module

    model, calib, test = _toy()
    plain = Recipe.preset("w4a8").replace(smooth_alpha=None, split_outliers=None)
    runs = [
        Run("ptq-plain", "static", plain),
        Run("ptq-auto", "static", Recipe.preset("w8a8")),
        Run("qat-plain", "static", plain, family="qat", epochs=1),
        Run("qat-auto", "static", Recipe.preset("w8a8"), family="qat", epochs=1),
    ]
    starts: dict[str, Any] = {}
    real = compare_module.qat_model

    def spy(model, run, *args, start=None, **kwargs):  # type: ignore[no-untyped-def]
        starts[run.name] = start
        return real(model, run, *args, start=start, **kwargs)

    monkeypatch.setattr(compare_module, "qat_model", spy)
    train = [(x, model(x).argmax(1).detach()) for x in calib]
    report = _compare_toy(model, calib, test, runs, train_data=train, latency_runs=1)
    rows = {r["name"]: r for r in report.results["runs"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert starts["qat-plain"] is not None and starts["qat-auto"] is None
    assert starts["qat-plain"].quant_info["recipe"] == plain.to_dict()
