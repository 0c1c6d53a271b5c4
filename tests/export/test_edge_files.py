"""`edgequant inspect` and `edgequant bench` on .tflite and .pte files: what the file holds
(flash, TFLite Micro's arena, ops, the int8 input and output grids) and its runtime's batch-1
latency. Never asserts a time bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from zoo import ZOO  # noqa: E402

import edgequant as eq
from edgequant.cli import main
from edgequant.export.edge_files import edge_latency_ms, inspect_edge


@pytest.fixture(scope="module")
def edge_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, eq.Recipe]:
    model, calib = ZOO["depthwise_separable"]()
    qmodel = eq.quantize(model, eq.Recipe.preset("w8a8").for_target("mcu-int8"), calib)
    folder = tmp_path_factory.mktemp("edge")
    tfl = eq.export_tflite(qmodel, folder / "m.tflite", calib[0][:1])
    pte = eq.export_executorch(qmodel, folder / "m.pte", calib[0][:1])
    return Path(tfl.path), Path(pte.path), tfl


def test_inspect_tflite_reports_flash_arena_ops_and_grids(edge_files: tuple) -> None:
    tflite, _, info = edge_files
    report = inspect_edge(tflite)
    assert report.kind == "tflite" and report.size_bytes == tflite.stat().st_size
    assert report.arena_bytes == info.arena_bytes and report.arena_bytes > 0
    assert report.ops == info.ops and report.float_ops == []
    (x,) = report.inputs
    assert x["dtype"] == "int8" and x["shape"][0] == 1
    assert (x["scale"], x["zero_point"]) == pytest.approx(info.input_quantization[0])
    text = report.format()
    assert f"arena (RAM):   {info.arena_bytes} B" in text and "integer:       yes" in text


def test_inspect_pte_reports_delegation_and_shapes(edge_files: tuple) -> None:
    _, pte, _ = edge_files
    report = inspect_edge(pte)
    assert report.kind == "pte" and report.size_bytes == pte.stat().st_size
    assert report.delegate_calls and report.delegate_calls > 0
    assert report.inputs[0]["dtype"] == "float32" and report.inputs[0]["shape"][0] == 1
    assert "XNNPACK:" in report.format()


def test_cli_inspect_and_bench_take_both_suffixes(
    edge_files: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    tflite, pte, _ = edge_files
    assert main(["inspect", str(tflite), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "tflite" and data["arena_bytes"] > 0
    assert main(["inspect", str(pte)]) == 0
    assert "(pte)" in capsys.readouterr().out
    assert main(["bench", str(tflite), "--vs", str(pte), "--runs", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "latency bs1" in out and "OTHER/MODEL" in out and "LiteRT" in out
    for path in (tflite, pte):
        (key,) = edge_latency_ms(path, warmup=1, runs=2, threads=1)
        assert key == "bs1"


def test_bad_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.tflite"):
        inspect_edge(tmp_path / "missing.tflite")
    empty = tmp_path / "empty.pte"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pte is not a .pte model: the file is empty"):
        edge_latency_ms(empty)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ValueError, match="junk.tflite is not a .tflite model its runtime loads"):
        inspect_edge(junk)
    with pytest.raises(ValueError, match="runs >= 1"):
        edge_latency_ms(junk, runs=0)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    assert main(["bench", str(junk), "--vs", str(onnx_file)]) != 0
    assert "bench compares a .tflite or .pte file" in capsys.readouterr().err
