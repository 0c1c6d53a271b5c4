"""eq.compare and the demo: isolation of failures, deployed metrics, the recommendation rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgequant.report.compare import Run, compare, recommend
from edgequant.spec import Recipe


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


def test_a_failing_method_is_reported_and_the_others_run(tmp_path: Path) -> None:
    model, calib, test = _toy()
    runs = [
        Run("static-w8a8", "static", Recipe.preset("w8a8")),
        # dynamic quantization needs 8-bit weights: this run must fail, alone
        Run("dynamic-w4a8", "dynamic", Recipe.preset("w4a8")),
        Run("weight-only-w8", "weight_only", Recipe.preset("w8a8")),
    ]
    model.train()  # the caller's flags and weights must survive compare (STYLE §9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = compare(
        model,
        calib,
        _accuracy(test),
        calib[0],
        runs=runs,
        out_dir=tmp_path,
        latency_runs=2,
        verify_data=[x for x, _ in test],
    )
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


def _row(name: str, metric: float, size: int, family: str = "ptq", labels: bool = False) -> dict:
    return {
        "name": name,
        "status": "ok",
        "metric_deployed": metric,
        "size_bytes": size,
        "size_ratio": size / 1000,
        "family": family,
        "labels_used": labels,
    }


def test_recommendation_prefers_no_labels_then_ptq_then_smaller_files() -> None:
    runs = [
        _row("qat-w4a4", 0.95, 100, family="qat", labels=True),
        _row("ptq-w8a8", 0.945, 300),
        _row("ptq-w4", 0.90, 150),  # outside the tolerance
        _row("ptq-w4a8", 0.942, 200),
    ]
    assert recommend(0.95, runs, tolerance=0.01)["choice"] == "ptq-w4a8"
    assert recommend(0.95, runs, tolerance=0.001)["choice"] == "qat-w4a4"
    none = recommend(0.99, runs, tolerance=0.01)
    assert none["choice"] is None and "qat-w4a4" in none["why"]


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


def test_demo_command_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    from edgequant.cli import main

    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["baseline"]["metric"] >= 0.90
    static = next(r for r in results["runs"] if r["name"] == "ptq-static-w8a8")
    assert static["status"] == "ok"
    assert static["metric_deployed"] >= results["baseline"]["metric"] - 0.01
    assert results["recommendation"]["choice"] is not None
