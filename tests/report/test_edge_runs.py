"""compare measures a run for an edge target in that target's runtime too: mcu-int8 as a .tflite
scored in LiteRT, executorch as a .pte scored in ExecuTorch, beside the ONNX figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from zoo import ZOO  # noqa: E402

from edgequant.recipe import Recipe
from edgequant.report.compare import Run, compare
from edgequant.report.edge_runs import edge_format


def test_edge_targets_are_scored_and_timed_in_their_runtime(tmp_path: Path) -> None:
    model, calib = ZOO["depthwise_separable"]()
    test = [
        torch.randn(16, *calib[0].shape[1:], generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    with torch.no_grad():
        labels = [model(x).argmax(1) for x in test]

    def agreement(predict) -> float:  # type: ignore[no-untyped-def]
        hits = sum(
            int((predict(x).argmax(1) == y).sum()) for x, y in zip(test, labels, strict=True)
        )
        return hits / sum(len(y) for y in labels)

    w8a8 = Recipe.preset("w8a8")
    runs = [
        Run("mcu", "static", w8a8.for_target("mcu-int8")),
        Run("et", "static", w8a8.for_target("executorch")),
        Run("ort", "static", w8a8),
    ]
    report = compare(
        model, calib, agreement, calib[0][:1], runs=runs, verify_data=calib[:1],
        out_dir=tmp_path, latency_runs=2, latency_batch_sizes=(1,),
    )  # fmt: skip
    rows = {r["name"]: r for r in report.results["runs"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert "edge" not in rows["ort"] and edge_format(w8a8) is None
    for name, fmt in (("mcu", "tflite"), ("et", "pte")):
        edge = rows[name]["edge"]
        assert edge["status"] == "ok", edge.get("error")
        assert edge["format"] == fmt and Path(edge["path"]).suffix == f".{fmt}"
        assert Path(edge["path"]).stat().st_size == edge["size_bytes"]
        # The same integer model in another runtime: the metric stays near the ONNX file's.
        assert edge["metric_deployed"] == pytest.approx(rows[name]["metric_deployed"], abs=0.1)
        assert list(edge["latency_ms"]) == ["bs1"] and edge["latency_ms"]["bs1"] > 0
    assert rows["mcu"]["edge"]["arena_bytes"] > 0
    text = (tmp_path / "report.md").read_text()
    assert "## In the target's own runtime" in text
    assert "- mcu: .tflite in LiteRT (default XNNPACK path)" in text and "- et: .pte in" in text
