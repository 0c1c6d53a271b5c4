"""cli/quantize.py: `edgequant quantize` end to end on the MNIST-1D example config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgequant.cli import main

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "mnist1d_cnn.yaml"


@pytest.fixture
def quick_config(tmp_path: Path) -> Path:
    """The example config with a CNN trained for 2 epochs into a temporary cache."""
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["model"] = {
        "function": "edgequant.examples.mnist1d:trained_cnn",
        "kwargs": {"epochs": 2, "cache_dir": str(tmp_path / "cache")},
    }
    config["calib_data"]["kwargs"]["n"] = 256
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_quantize_cli_writes_a_verified_integer_model(
    quick_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgequant.export.inspect import inspect_onnx

    out = tmp_path / "cnn.int8.onnx"
    argv = ["quantize", "--config", str(quick_config), "--recipe", "w8a8", "--method", "static"]
    assert main([*argv, "--out", str(out), "--num-samples", "128"]) == 0
    printed = capsys.readouterr()
    stdout = printed.out
    assert "calibrating" in printed.err  # the progress bar, on stderr
    assert "recipe 'w8a8'" in stdout and "conv3" in stdout  # the quantization summary
    assert "calibrated on 128 samples" in stdout
    assert "accuracy on eval_data: float" in stdout
    assert f"wrote {out}" in stdout and "verified in ONNX Runtime" in stdout
    report = inspect_onnx(out)
    assert report.is_integer

    quiet = tmp_path / "cnn.w4a8.onnx"
    assert (
        main(
            [
                "quantize",
                "--config",
                str(quick_config),
                "--recipe",
                "w4a8",
                "--out",
                str(quiet),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    assert printed.err == ""  # --quiet: no progress
    lines = printed.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {quiet}")


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgequant: error: "), captured.err
    return lines[0]


def test_quantize_cli_user_errors_are_one_line_and_write_nothing(
    quick_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "m.onnx"
    base = ["quantize", "--config", str(quick_config), "--out", str(out)]

    bad = tmp_path / "bad.yaml"
    bad.write_text(quick_config.read_text().replace("metric: accuracy", "metirc: accuracy"))
    line = _fails(["quantize", "--config", str(bad), "--out", str(out)], capsys)
    assert "bad.yaml, line" in line and "'metirc'" in line and "did you mean 'metric'" in line
    assert "no such file: " in _fails(
        ["quantize", "--config", str(tmp_path / "none.yaml"), "--out", str(out)], capsys
    )
    assert "unknown preset 'w9z9'" in _fails([*base, "--recipe", "w9z9"], capsys)
    assert "unknown --method 'fast'" in _fails([*base, "--method", "fast"], capsys)
    assert "unknown --weight-storage 'uint4'" in _fails(
        [*base, "--weight-storage", "uint4"], capsys
    )
    assert "does not exist" in _fails([*base[:-1], str(tmp_path / "no" / "m.onnx")], capsys)
    assert "must end in .onnx" in _fails([*base[:-1], str(tmp_path / "m.pt")], capsys)
    # A ValueError from the library: static quantization of a weight-only recipe.
    assert "use method='weight_only'" in _fails([*base, "--recipe", "w8-weight-only"], capsys)

    import edgequant

    def broken_export(*args: object, **kwargs: object) -> None:
        raise edgequant.ExportError(
            "the exported model does not compute what the simulation computes\nmore"
        )

    monkeypatch.setattr(edgequant, "export_onnx", broken_export)
    assert "export failed: the exported model" in _fails([*base, "--quiet"], capsys)
    assert not out.exists() and not any(tmp_path.glob("*.onnx*"))
