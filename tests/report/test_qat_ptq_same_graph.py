"""QAT and PTQ runs of one recipe in eq.compare export the same integer graph: the same nodes
in the same order and the same integer initializers (dtype and shape), so that they run at the
same speed and a latency gap between them can only be the machine's (issue 31)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgequant.recipe import Recipe
from edgequant.report.compare import Run, compare
from edgequant.report.demo import graph_signature, qat_vs_ptq_speed


def _graph(path: str) -> tuple[list[str], list[tuple[str, int, tuple[int, ...]]]]:
    """(node op types in order, sorted (initializer name, dtype, shape))."""
    import onnx

    graph = onnx.load(path).graph
    return (
        [node.op_type for node in graph.node],
        sorted((i.name, i.data_type, tuple(i.dims)) for i in graph.initializer),
    )


@pytest.mark.parametrize("preset", ["w8a8", "w4a4"])
def test_qat_and_ptq_of_one_recipe_export_the_same_integer_graph(
    tmp_path: Path, preset: str
) -> None:
    from edgequant.examples.mnist1d import cnn1d

    torch.manual_seed(0)
    model = cnn1d(channels=8, seed=0).eval()
    x = torch.randn(384, 1, 40)
    with torch.no_grad():
        y = model(x).argmax(1)
    calib = list(x[:128].split(64))
    train = list(zip(x[128:].split(32), y[128:].split(32), strict=True))
    recipe = Recipe.preset(preset).replace(rounding="gptq" if preset == "w4a4" else "nearest")
    report = compare(
        model,
        calib,
        lambda predict: float((predict(x[:64]).argmax(1) == y[:64]).float().mean()),
        calib[0][:4],
        train_data=train,
        runs=[
            Run("ptq", "static", recipe),
            # lr high enough that the trained epochs differ from the start: the kept epoch may
            # be any, the graph must not change with it.
            Run("qat", "static", recipe, family="qat", epochs=2, lr=1e-2),
        ],
        out_dir=tmp_path,
        latency_runs=1,
    )
    rows = {r["name"]: r for r in report.results["runs"]}
    assert rows["ptq"]["status"] == "ok" and rows["qat"]["status"] == "ok", rows
    ptq_ops, ptq_init = _graph(rows["ptq"]["onnx"])
    qat_ops, qat_init = _graph(rows["qat"]["onnx"])
    assert qat_ops == ptq_ops
    assert qat_init == ptq_init
    assert "QuantizeLinear" in ptq_ops and "DequantizeLinear" in ptq_ops
    assert rows["qat"]["size_bytes"] == rows["ptq"]["size_bytes"]
    # The demo's check of the same: the signature it compares, and the pair timed interleaved.
    assert graph_signature(rows["qat"]["onnx"]) == graph_signature(rows["ptq"]["onnx"])
    assert graph_signature(rows["ptq"]["onnx"]) != graph_signature(
        report.results["baseline"]["onnx"]
    )
    (pair,) = qat_vs_ptq_speed(report.results, runs=3, threads=1)
    assert pair["bits"] == preset.upper() and pair["same_graph"] is True
    assert (pair["ptq"], pair["qat"]) == ("ptq", "qat")
    for key in ("bs1", "bs64"):
        ptq_ms, qat_ms = pair["latency_ms"]["ptq"][key], pair["latency_ms"]["qat"][key]
        assert ptq_ms > 0 and qat_ms > 0
        assert pair["ratio_qat_to_ptq"][key] == pytest.approx(qat_ms / ptq_ms)
