"""edgequant subcommands given a bad --out, or hitting an OS error: one line, exit status 2, no
traceback, and before any slow work."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgequant.cli import main


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("edgequant: error: ")
    return lines[0]


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_out_inside_a_file_is_refused_first(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    # Before: NotADirectoryError traceback from the report's mkdir, after the whole run.
    import edgequant.report.compare
    import edgequant.report.demo

    def slow_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started before --out was checked")

    monkeypatch.setattr(edgequant.report.demo, "run_demo", slow_work)
    monkeypatch.setattr(edgequant.report.compare, "compare", slow_work)
    config = tmp_path / "c.yaml"
    config.write_text("model: m:f\ncalib_data: m:g\neval_data: m:h\n")
    out = str(config / "run")
    argv = (
        ["demo", "--out", out]
        if command == "demo"
        else ["compare", "--config", str(config), "--out", out]
    )
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out: {out!r} cannot be created: {str(config)!r} is a file" in line


def test_demo_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "file"), "--quick", "--quiet"]) == 2
    assert "exists and is not a folder" in _one_error_line(capsys.readouterr().err)


def test_an_os_error_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: only FileNotFoundError was caught; PermissionError, IsADirectoryError, a full disk
    # (OSError ENOSPC) printed a traceback and exited 1.
    import edgequant.report.demo

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "models"))

    monkeypatch.setattr(edgequant.report.demo, "run_demo", denied)
    assert main(["demo", "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"edgequant: error: Permission denied: {tmp_path / 'run' / 'models'}"
