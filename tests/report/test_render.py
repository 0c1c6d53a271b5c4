"""report.render and Report.save: the markdown table, the self-contained HTML page (and how it
looks in a real headless browser), every file of a saved report, written atomically."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from toys import failed_row, result_row  # tests/toys.py

from edgequant.report import plots
from edgequant.report.compare import Report
from edgequant.report.render import COLUMNS, html, markdown, table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The failed run's error: markup and quotes that must reach the page as text, and longer than the
# 80 characters the markdown table keeps.
ERROR = 'RuntimeError: <script>alert("x")</script> & <b>diverged</b> ' + "y" * 80
TRACEBACK = "Traceback (most recent call last):\n  <frame>\n" + ERROR


def _run(name: str, family: str, method: str, w: int, *rest: Any) -> dict[str, Any]:
    """A run with a recipe name, a simulated metric above the deployed one and no labels."""
    row = result_row(name, family, method, w, *rest, recipe=f"w{w}", top1_agreement=0.995)
    row.update(metric_simulated=row["metric_deployed"] + 0.001, wall_s=2.5, labels_used=False)
    return row


def results() -> dict[str, Any]:
    return {
        "task": "toy <cnn> & friends",
        "metric": "accuracy",
        "tolerance": 0.01,
        "baseline": {
            "metric": 0.95,
            "metric_torch": 0.95,
            "size_bytes": 120_000,
            "latency_ms": {"bs1": 0.12, "bs64": 2.3},
            "wall_s": 1.5,
        },
        "runs": [
            _run("ptq-static-w8a8", "ptq", "static", 8, 8, 0.947, 33_000, 0.05, 0.9),
            _run("ptq-static-w4a8", "ptq", "static", 4, 8, 0.930, 19_000, 0.07, 1.1),
            _run("ptq-weight-only-w4", "ptq", "weight_only", 4, None, 0.940, 18_000, 0.11, 2.2),
            failed_row(
                "ptq-static-w4a4",
                "ptq",
                "static",
                4,
                4,
                error=ERROR,
                wall_s=0.3,
                traceback=TRACEBACK,
            ),
        ],
        "recommendation": {
            "choice": "ptq-weight-only-w4",
            "why": "ptq-weight-only-w4 deploys at 0.9400 < 0.95 & needs no labels",
        },
        "environment": {"torch": "2.13.0", "onnxruntime": "1.22", "cpu": "x86_64", "threads": 2},
    }


SUMMARIES = {
    "ptq-static-w8a8": "layer   bits\nconv1   W8 A8 <per-channel>\n",
    "ptq-weight-only-w4": "layer   bits\nconv1   W4",
}


# The plots results() has something for: no bit width has both PTQ and QAT, so no ptq_vs_qat.
DRAWN = [name for name in plots.PLOTS if name != "ptq_vs_qat"]


def _plots(folder: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    drawn = {name: plot(results(), folder) for name, plot in plots.PLOTS.items()}
    assert [name for name, path in drawn.items() if path is not None] == DRAWN
    return {name: path for name, path in drawn.items() if path is not None}


# --------------------------------------------------------------------------------- markdown


def test_markdown_table_rows() -> None:
    lines = table(results()).splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert lines[2] == (
        "| fp32 | - | 32/32 | 0.9500 | 0.9500 | - | 120000 | 1.00 | 0.120 / 2.30 | 1.5 |"
    )
    assert lines[3] == (
        "| ptq-static-w8a8 | ptq | 8/8 | 0.9470 | 0.9480 | 0.9950 | 33000 | 0.28 | 0.050 / 0.90 "
        "| 2.5 |"
    )
    assert lines[5].startswith("| ptq-weight-only-w4 | ptq | 4/- | 0.9400 |")
    assert lines[6] == f"| ptq-static-w4a4 | ptq | 4/4 | FAILED: {ERROR[:80]} | | | | | | |"
    assert all(line.count("|") == len(COLUMNS) + 1 for line in lines if "FAILED" not in line)


def test_markdown_report() -> None:
    text = markdown(results(), SUMMARIES)
    assert text.startswith("# edgequant report: toy <cnn> & friends\n")
    assert "**Recommendation:** ptq-weight-only-w4. ptq-weight-only-w4 deploys at 0.9400" in text
    assert "### ptq-static-w8a8\n\n```\nlayer   bits\n" in text


# ------------------------------------------------------------------------------------- html


class _Page(HTMLParser):
    """Collects the tags, attributes and text of a page and checks that tags nest."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.errors.append(f"</{tag}> does not close the open tag")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.open == [], (parser.errors, parser.open)
    return parser


def test_html_page_holds_the_recommendation_table_plots_and_summaries(tmp_path: Path) -> None:
    paths = _plots(tmp_path)
    page = html(results(), SUMMARIES, paths)
    parsed = _parse(page)
    text = "".join(parsed.text)
    assert page.startswith("<!DOCTYPE html>")
    # The recommendation and why, as text.
    assert "Recommendation: ptq-weight-only-w4" in text
    assert "deploys at 0.9400 < 0.95 & needs no labels" in text
    # The runs table: the markdown table's columns and one row per run, the pick highlighted.
    rows = re.findall(r'<tr class="(\w+)">(.*?)</tr>', page)
    assert [css for css, _ in rows] == ["baseline", "ok", "ok", "chosen", "failed"]
    header = re.findall(r"<th>(.*?)</th>", page)
    assert header == [c.replace("&", "&amp;") for c in COLUMNS]
    assert "<td>0.9470</td><td>0.9480</td><td>0.9950</td><td>33000</td><td>0.28</td>" in page
    # The failed run, in red (its row's class), with its whole error.
    failed = rows[-1][1]
    assert 'class="error" colspan="7"' in failed and "y" * 80 in failed
    assert re.search(r"tr\.failed td \{[^}]*color: #b00020", page)
    # Every plot embedded as a PNG data URI, none referenced by path.
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == len(DRAWN)
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
    # Each run's summary (a failed run's traceback) in a <details>.
    assert sum(tag == "details" for tag, _ in parsed.tags) == len(results()["runs"])
    assert "conv1   W8 A8 <per-channel>" in text and "Traceback (most recent call last)" in text


def test_html_escapes_every_text_and_loads_nothing(tmp_path: Path) -> None:
    page = html(results(), SUMMARIES, _plots(tmp_path))
    for raw in ("<script>", "<b>", "<cnn>", "<per-channel>", "<frame>", "< 0.95 &"):
        assert raw not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;diverged" in page
    assert "toy &lt;cnn&gt; &amp; friends" in page
    # Self-contained: no scripts, no stylesheets or images from elsewhere, no URLs at all.
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "url(" not in page and "@import" not in page


def test_html_without_a_recommendation_or_plots() -> None:
    data = results()
    data["recommendation"] = {"choice": None, "why": "no method came within 0.010"}
    page = html(data)
    _parse(page)
    assert "Recommendation: none of the methods tried" in page
    assert '<div class="recommendation none">' in page
    assert "<img" not in page and "<h2>Plots</h2>" not in page


def test_html_names_a_plot_that_could_not_be_drawn() -> None:
    page = html(results(), plot_errors={"latency": "ValueError: <no timings>"})
    assert "Latency in ONNX Runtime: not drawn (ValueError: &lt;no timings&gt;)" in page


# ------------------------------------------------------------------------------ Report.save


def test_save_writes_every_file_atomically(tmp_path: Path) -> None:
    report = Report(results(), dict(SUMMARIES))
    out = report.save(tmp_path / "run")
    assert out == tmp_path / "run"
    assert json.loads((out / "results.json").read_text()) == results()
    assert (out / "report.md").read_text() == markdown(results(), SUMMARIES)
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(DRAWN)
    assert sorted(p.name for p in out.iterdir()) == [
        "plots",
        "report.html",
        "report.md",
        "results.json",
    ]
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        f"{name}.png" for name in DRAWN
    )
    for png in (out / "plots").iterdir():
        assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_save_reports_a_failing_plot_and_writes_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Report(results(), dict(SUMMARIES)).save(tmp_path)  # an earlier report with every plot
    assert (tmp_path / "plots" / "latency.png").is_file()

    def broken(results: dict[str, Any], out_dir: str | Path) -> Path:
        raise ValueError("no timings")

    monkeypatch.setitem(plots.PLOTS, "latency", broken)
    with pytest.warns(UserWarning, match="plot 'latency' not drawn: ValueError: no timings"):
        Report(results(), dict(SUMMARIES)).save(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "Latency in ONNX Runtime: not drawn (ValueError: no timings)" in page
    assert page.count("<img ") == len(DRAWN) - 1
    # The old latency picture would show another run's numbers: it is gone.
    assert not (tmp_path / "plots" / "latency.png").exists()
    assert (tmp_path / "results.json").is_file() and (tmp_path / "report.md").is_file()


# --------------------------------------------------------------------- in a headless browser

CHROMIUM = shutil.which("chromium")


def _near(pixels: Any, rgb: tuple[int, int, int], tolerance: int = 3) -> int:
    """How many pixels are within `tolerance` of the colour, per channel."""
    import numpy as np

    return int((np.abs(pixels.astype(int) - np.array(rgb)) <= tolerance).all(axis=-1).sum())


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium): the HTML report is not checked "
    "in a real browser",
)
def test_report_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    out = Report(results(), dict(SUMMARIES)).save(tmp_path / "run")
    shot = tmp_path / "screenshot.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        (out / "report.html").resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot; chromium said: {done.stderr[-2000:]}"
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        pixels = np.asarray(image.convert("RGB"))
    # Not blank: the page drew text, boxes and pictures over much of the window.
    assert (pixels < 250).any(axis=-1).mean() > 0.05
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    # The inline CSS applied: the recommendation's green box and the failed run's red row...
    assert _near(pixels, (0xEE, 0xF7, 0xEE)) > 5_000
    assert _near(pixels, (0xFD, 0xEC, 0xEA)) > 2_000
    # ...and the embedded plots were decoded and drawn: PTQ's blue is only in them.
    assert _near(pixels, (0x1F, 0x77, 0xB4), tolerance=6) > 2_000


# ------------------------------------------------------------------- PTQ vs QAT by bits


def _sweep_results() -> dict[str, Any]:
    """results() with a bit sweep: PTQ and QAT at W8A8 and W2A2, and a test split on which
    nothing was chosen (0.01 below what the recommendation saw)."""
    data = results()
    data["runs"] += [
        _run("ptq-static-w2a2", "ptq", "static", 2, 2, 0.70, 15_000, 0.06, 1.0),
        _run("qat-w8a8", "qat", "static", 8, 8, 0.948, 33_000, 0.05, 0.9),
        _run("qat-w2a2", "qat", "static", 2, 2, 0.90, 15_000, 0.06, 1.0),
    ]
    data["runs"][-1]["kept_epoch"] = 3
    data["baseline"]["metric_test"] = 0.94
    for run in data["runs"]:
        if run["status"] == "ok":
            run["metric_test"] = run["metric_deployed"] - 0.01
    data["notes"] = ["splits: <val> chooses, test reports"]
    return data


def test_sweep_section_names_where_ptq_stops_and_what_qat_recovers(tmp_path: Path) -> None:
    data = _sweep_results()
    text = markdown(data)
    # The runs table gains the test column after "deployed".
    assert "| run | family | bits W/A | deployed | test (unseen) | simulated |" in text
    assert "| fp32 | - | 32/32 | 0.9500 | 0.9400 | 0.9500 |" in text
    assert "- splits: <val> chooses, test reports" in text
    assert "## PTQ vs QAT by bits" in text
    assert (
        "PTQ holds within 0.01 of FP32 down to W8A8; at W2A2 it falls 25.0 points below FP32 on "
        "the data the recommendation saw. On the test split, which nothing was chosen on: W2A2 "
        "PTQ 25.0 points below FP32, QAT recovers 20.0 (80 % of the gap)." in text
    )
    assert "| W2A2 | 0.7000 | 0.9000 | 0.6900 | 0.8900 | 25.0 | 80 % | 3 |" in text
    assert "| W8A8 | 0.9470 | 0.9480 | 0.9370 | 0.9380 | 0.3 | - | - |" in text
    # In the page: the section, its table and its figure, before the other plots.
    drawn = {
        name: path
        for name, plot in plots.PLOTS.items()
        if (path := plot(data, tmp_path)) is not None
    }
    assert set(drawn) == set(plots.PLOTS)
    page = html(data, {}, drawn)
    _parse(page)
    assert page.index("<h2>PTQ vs QAT by bits</h2>") < page.index('id="plot-ptq_vs_qat"')
    assert page.index('id="plot-ptq_vs_qat"') < page.index("<h2>Plots</h2>")
    assert page.count('id="plot-ptq_vs_qat"') == 1
    assert "&lt;val&gt; chooses" in page
    # Without a bit width that has both, no section.
    assert "PTQ vs QAT by bits" not in markdown(results())
    # No speed sentence without the demo's interleaved timing.
    assert "QAT / PTQ latency" not in text


def test_sweep_section_says_whether_qat_and_ptq_are_one_graph_and_their_speed_ratio() -> None:
    data = _sweep_results()
    data["qat_vs_ptq_speed"] = [
        {
            "bits": "W8A8",
            "ptq": "ptq-static-w8a8",
            "qat": "qat-w8a8",
            "same_graph": True,
            "latency_ms": {"ptq": {"bs1": 0.05, "bs64": 0.9}, "qat": {"bs1": 0.051, "bs64": 0.88}},
            "ratio_qat_to_ptq": {"bs64": 0.88 / 0.9, "bs1": 0.051 / 0.05},
            "runs": 200,
        },
        {
            "bits": "W2A2",
            "ptq": "ptq-static-w2a2",
            "qat": "qat-w2a2",
            "same_graph": False,
            "latency_ms": {"ptq": {"bs1": 0.06, "bs64": 1.0}, "qat": {"bs1": 0.15, "bs64": 2.5}},
            "ratio_qat_to_ptq": {"bs1": 2.5, "bs64": 2.5},
            "runs": 200,
        },
    ]
    sentence = (
        "each pair timed interleaved, run by run (200 runs per batch size): W8A8: the same "
        "integer graph, QAT / PTQ latency 1.02x at batch 1, 0.98x at batch 64; W2A2: DIFFERENT "
        "graphs, QAT / PTQ latency 2.50x at batch 1, 2.50x at batch 64."
    )
    text = markdown(data)
    assert sentence in text
    assert text.index("## PTQ vs QAT by bits") < text.index(sentence)
    page = html(data)
    _parse(page)
    assert sentence in page
