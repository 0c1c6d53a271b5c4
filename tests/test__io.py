"""_io.py: atomic writes; readers see the old file or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgequant._io import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_writes_replace_the_file_and_leave_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    atomic_write_text(path, "first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="half-way"), atomic_path(path) as tmp:
        tmp.write_text("half of a new file")
        raise RuntimeError("failed half-way")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"the folder '.*nowhere' does not exist"):
        atomic_write_text(tmp_path / "nowhere" / "out.txt", "x")
