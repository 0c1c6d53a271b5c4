"""examples/shared.py: where the shared folder of real data and weights is found; a missing
folder or file is named, never replaced by a silent fall-back."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgequant.examples.shared import ENV_VAR, require_shared, shared_dir


def test_the_environment_variable_decides_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert shared_dir() == tmp_path.resolve()
    assert require_shared("data") == tmp_path.resolve() / "data"
    with pytest.raises(FileNotFoundError, match=r"models/none\.th does not exist"):
        require_shared("models/none.th")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "absent"))
    assert shared_dir() is None  # set but absent: no fall-back to ../shared
    with pytest.raises(FileNotFoundError, match=rf"looked in: .*absent\).*Set .*{ENV_VAR}"):
        require_shared("data")
