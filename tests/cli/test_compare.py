"""edgequant compare --config: runs from the config's recipes, the saved report, what it prints,
and one-line errors with exit status 2."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from edgequant.cli import COMMANDS, main
from edgequant.report.plots import PLOTS

# The MNIST-1D example (examples/mnist1d_cnn.yaml) cut to two recipes, for a test under 40 s.
MNIST1D_CONFIG = """\
task: mnist1d-cnn-test
model: edgequant.examples.mnist1d:trained_cnn
calib_data:
  function: edgequant.examples.mnist1d:calib_batches
  kwargs: {n: 256, batch_size: 64, seed: 0}
eval_data: edgequant.examples.mnist1d:eval_batches
metric: accuracy
tolerance: 0.01
recipes: [w8a8, w4-weight-only]
"""

# A model and data module next to the config: found because the config's folder comes first.
TINY_MODULE = """\
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _x():
    return torch.randn(256, 16, generator=torch.Generator().manual_seed(1))


def calib():
    return list(_x()[:128].split(32))


def evaluation():
    x = _x()[128:]
    with torch.no_grad():
        y = model()(x).argmax(1)
    return list(zip(x.split(64), y.split(64)))
"""


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_compare_is_registered() -> None:
    assert "compare" in COMMANDS


def test_compare_on_mnist1d(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mnist1d")
    config = _write(tmp_path, "mnist1d.yaml", MNIST1D_CONFIG)
    out = tmp_path / "run"
    assert main(["compare", "--config", str(config), "--out", str(out), "--quick"]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "mnist1d-cnn-test" and results["metric"] == "accuracy"
    assert results["baseline"]["metric"] >= 0.90
    runs = {r["name"]: r for r in results["runs"]}
    # One run per recipe: static for W8A8, weight_only for the weight-only recipe.
    assert list(runs) == ["ptq-static-w8a8", "ptq-weight-only-w4"]
    assert runs["ptq-static-w8a8"]["method"] == "static"
    assert runs["ptq-weight-only-w4"]["method"] == "weight_only"
    assert all(r["status"] == "ok" for r in runs.values())
    # --quick calibrates on at most 128 samples; the metric still uses the whole test split.
    assert runs["ptq-static-w8a8"]["samples_used"] == 128
    assert runs["ptq-static-w8a8"]["metric_deployed"] >= results["baseline"]["metric"] - 0.01
    assert results["recommendation"]["choice"] in runs

    for name in ("report.md", "report.html", "models/ptq-static-w8a8.onnx"):
        assert (out / name).is_file(), name
    # No QAT run, so no "PTQ vs QAT by bits" figure: every other plot is drawn.
    drawn = sorted(f"{n}.png" for n in PLOTS if n != "ptq_vs_qat")
    assert sorted(p.name for p in (out / "plots").iterdir()) == drawn

    printed = capsys.readouterr()
    assert "| run | family | bits W/A | deployed |" in printed.out
    assert "| ptq-weight-only-w4 | ptq | 4/- |" in printed.out
    assert f"Recommendation: {results['recommendation']['choice']}." in printed.out
    assert str(out / "report.html") in printed.out
    assert "ptq-static-w8a8: deployed accuracy" in printed.err  # progress goes to stderr


@pytest.mark.slow  # minutes on 2 cores: run with the benchmarks (pytest -m slow)
def test_compare_quiet_runs_the_default_set_for_a_config_without_recipes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, "tiny_compare_task.py", TINY_MODULE)
    config = _write(
        tmp_path,
        "tiny.yaml",
        """\
        model: tiny_compare_task:model
        calib_data: tiny_compare_task:calib
        eval_data: tiny_compare_task:evaluation
        tolerance: 0.05
        num_samples: 64
        """,
    )
    out = tmp_path / "run"
    assert main(["compare", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()
    # --quiet: no progress, one line.
    assert printed.err == ""
    assert printed.out.startswith("recommendation: ") and printed.out.count("\n") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "tiny"  # the file's name
    # The default set; the config has no train_data, so no QAT runs.
    assert [r["name"] for r in results["runs"]] == [
        "ptq-dynamic-w8a8",
        "ptq-static-w8a8",
        "ptq-weight-only-w4",
        "ptq-static-w4a8",
        "ptq-static-w4a4",
        "mixed-w3avg-a8",
    ]
    static = results["runs"][1]
    assert static["status"] == "ok" and static["samples_used"] == 64  # the config's num_samples
    # The labels are the float model's own predictions: W8A8 keeps nearly all of them.
    assert static["metric_deployed"] >= 0.95
    assert (out / "report.html").is_file()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "no such file"),
        ("model: m:f\ncalib_data: m:g\n", "eval_data: compare measures the metric on it"),
        ("model: m:f\ncalib_data: m:g\neval_data: m:h\nmodle: x\n", "line 4: unknown key 'modle'"),
        ("model: m:f\ncalib_data: m:g\neval_data: m:h\n", "model: module 'm' not found"),
    ],
)
def test_compare_errors_are_one_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str | None, message: str
) -> None:
    path = tmp_path / "c.yaml"
    if config is not None:
        path.write_text(config)
    assert main(["compare", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    # Progress lines may come first; the error is one line, the last, with no traceback.
    assert err.splitlines()[-1].startswith("edgequant: error: ") and "Traceback" not in err, err
    assert err.count("edgequant: error") == 1 and message in err.splitlines()[-1]


def test_compare_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(tmp_path, "c.yaml", "model: m:f\ncalib_data: m:g\neval_data: m:h\n")
    (tmp_path / "file").write_text("")
    assert main(["compare", "--config", str(config), "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_compare_needs_config_and_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--out", "x"]) == 2
    assert "--config" in capsys.readouterr().err
