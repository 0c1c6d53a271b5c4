"""Report (report/results.py): saving results that cannot be rendered leaves the old report as it
was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgequant.report.compare import Report


def test_save_of_unrenderable_results_leaves_the_old_report(tmp_path: Path) -> None:
    # Was: results.json replaced, then a KeyError, beside the old report.md and report.html.
    (tmp_path / "results.json").write_text('{"old": true}')
    (tmp_path / "report.md").write_text("old report")
    with pytest.raises(ValueError, match=r"Report.results lacks the keys \['task', 'metric'"):
        Report({"runs": []}).save(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]
