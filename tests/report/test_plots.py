"""report.plots: each plot is a real PNG written atomically; failed runs are named, not drawn;
the Pareto front; importing the module does not import matplotlib."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from toys import failed_row, result_row  # tests/toys.py

from edgequant.report import plots
from edgequant.report.plots import PLOTS, pareto_front

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def results() -> dict[str, Any]:
    """A results file (DESIGN §1) with four PTQ runs, one QAT run and one failed run."""
    return {
        "task": "toy",
        "metric": "accuracy",
        "tolerance": 0.01,
        "baseline": {
            "metric": 0.95,
            "size_bytes": 120_000,
            "latency_ms": {"bs1": 0.12, "bs64": 2.3},
        },
        "runs": [
            result_row("ptq-dynamic-w8a8", "ptq", "dynamic", 8, 8, 0.949, 34_000, 0.10, 2.0),
            result_row("ptq-static-w8a8", "ptq", "static", 8, 8, 0.947, 33_000, 0.05, 0.9),
            result_row("ptq-static-w4a8", "ptq", "static", 4, 8, 0.930, 19_000, 0.07, 1.1),
            result_row(
                "ptq-weight-only-w4", "ptq", "weight_only", 4, None, 0.940, 18_000, 0.11, 2.2
            ),
            result_row("qat-w4a4", "qat", "static", 4, 4, 0.945, 17_500, 0.06, 1.0),
            failed_row(
                "qat-w8a8", "qat", "static", 8, 8, error="RuntimeError: diverged", wall_s=0.2
            ),
        ],
        "recommendation": {"choice": "ptq-static-w8a8", "why": "within tolerance"},
        "environment": {"torch": "2.13.0", "onnxruntime": "1.22", "cpu": "x86_64", "threads": 2},
    }


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG standard puts first."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def sweep_results(test_split: bool = False) -> dict[str, Any]:
    """results() with static PTQ at W4A4 beside its QAT run: PTQ holds at W8A8 (its QAT run
    failed) and falls 5 points at W4A4, where QAT recovers 4 of them. test_split: every run
    also has "metric_test", 0.01 lower."""
    data = results()
    data["runs"].insert(
        3, result_row("ptq-static-w4a4", "ptq", "static", 4, 4, 0.90, 17_500, 0.06, 1.0)
    )
    if test_split:
        data["baseline"]["metric_test"] = data["baseline"]["metric"] - 0.01
        for run in data["runs"]:
            if run["status"] == "ok":
                run["metric_test"] = run["metric_deployed"] - 0.01
    return data


def _results_for(name: str) -> dict[str, Any]:
    """The results each plot has something to draw from: ptq_vs_qat needs a bit width at which
    both PTQ and QAT ran."""
    return sweep_results() if name == "ptq_vs_qat" else results()


@pytest.mark.parametrize("name", list(PLOTS))
def test_each_plot_writes_a_png_named_after_it(tmp_path: Path, name: str) -> None:
    stale = tmp_path / f"{name}.png"
    stale.write_bytes(b"an older picture")
    path = PLOTS[name](_results_for(name), tmp_path)
    assert path == stale
    data = path.read_bytes()
    width, height = _png_size(data)
    assert width >= 600 and height >= 250
    assert len(data) > 10_000  # axes, text and points, not an empty canvas
    # Atomic: the temp file was renamed into place, none is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.png"]


def _drawn(
    monkeypatch: pytest.MonkeyPatch, plot: Callable[..., Any], data: dict[str, Any], out: Path
) -> Any:
    """The figure `plot` draws from `data` into `out`, caught on its way to plots._save."""
    figures: list[Any] = []
    save = plots._save

    def keep(fig: Any, path: Path) -> Path:
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    plot(data, out)
    return figures[0]


def _texts(fig: Any) -> list[str]:
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    for legend in [ax.get_legend() for ax in fig.axes] + list(fig.legends):
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()]
    return texts


@pytest.mark.parametrize("name", list(PLOTS))
def test_failed_runs_are_named_in_the_legend_not_drawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    texts = _texts(_drawn(monkeypatch, PLOTS[name], _results_for(name), tmp_path))
    assert "qat-w8a8: failed" in texts
    assert not any("qat-w8a8" in t and "failed" not in t for t in texts)


def test_size_vs_metric_labels_every_point_and_rings_the_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fig = _drawn(monkeypatch, plots.size_vs_metric, results(), tmp_path)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == sorted(
        [
            "fp32",
            "ptq-dynamic-w8a8",
            "ptq-static-w8a8",
            "ptq-static-w4a8",
            "ptq-weight-only-w4",
            "qat-w4a4",
        ]
    )
    # The staircase joins the front: qat-w4a4 (17.5 kB, 0.945), ptq-static-w8a8 (33 kB, 0.947),
    # ptq-dynamic-w8a8 (34 kB, 0.949), fp32 (120 kB, 0.95); W4A8 and weight-only W4 are beaten.
    front = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    assert list(front.get_xdata()) == [17.5, 33.0, 34.0, 120.0]
    assert list(front.get_ydata()) == [0.945, 0.947, 0.949, 0.95]
    # No two labels cover each other.
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_metric_vs_bits_has_one_line_per_family_method_and_activation_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ax,) = _drawn(monkeypatch, plots.metric_vs_bits, results(), tmp_path).axes
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label()[0] != "_"}
    assert {"ptq static A8", "ptq dynamic A8", "ptq weight-only", "qat static A4"} <= set(lines)
    assert list(lines["ptq static A8"].get_ydata()) == [0.930, 0.947]  # W4A8 then W8A8
    assert list(ax.get_xticks()) == [4, 8]


def test_latency_has_a_panel_per_batch_size_with_fp32_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    axes = _drawn(monkeypatch, plots.latency, results(), tmp_path).axes
    assert [ax.get_title() for ax in axes] == ["batch 1", "batch 64"]
    names = [t.get_text() for t in axes[0].get_yticklabels()]
    assert names[0] == "fp32" and len(names) == 6  # fp32 and the five runs that finished
    widths = [bar.get_width() for bar in axes[1].patches]
    assert widths == [2.3, 2.0, 0.9, 1.1, 2.2, 1.0]


def test_pareto_front() -> None:
    points = [(10, 0.90), (20, 0.95), (15, 0.85), (30, 0.95), (5, 0.50), (10, 0.80)]
    # (30, 0.95) is no better than (20, 0.95); (15, 0.85) and (10, 0.80) lose to (10, 0.90).
    assert pareto_front(points) == [4, 0, 1]
    assert pareto_front([]) == []


def test_text_that_matplotlib_would_read_as_math_is_drawn_as_is(tmp_path: Path) -> None:
    odd = sweep_results()
    odd["task"] = "cost $1"  # a lone "$" would start mathtext and fail the figure
    odd["runs"][0]["name"] = "run_$a$_b$"
    for plot in PLOTS.values():
        path = plot(odd, tmp_path)
        assert path is not None and path.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_draw_when_every_run_failed(tmp_path: Path) -> None:
    bad = results()
    bad["runs"] = [r for r in bad["runs"] if r["status"] != "ok"]
    (tmp_path / "ptq_vs_qat.png").write_bytes(b"an older picture")
    for name, plot in PLOTS.items():
        path = plot(bad, tmp_path)
        if name == "ptq_vs_qat":
            # No bit width with both PTQ and QAT: nothing to draw, and no stale picture left.
            assert path is None and not (tmp_path / "ptq_vs_qat.png").exists()
        else:
            assert path is not None and path.read_bytes()[:8] == PNG_SIGNATURE


def test_bit_sweep_pairs_static_ptq_with_qat_and_finds_the_crossover() -> None:
    rows = plots.bit_sweep(sweep_results())
    # W8A8's QAT run failed: only W4A4 has both; dynamic, weight-only and W4A8 are left out.
    assert rows == [
        {
            "label": "W4A4",
            "weight_bits": 4,
            "act_bits": 4,
            "ptq": 0.90,
            "ptq_name": "ptq-static-w4a4",
            "qat": 0.945,
            "qat_name": "qat-w4a4",
        }
    ]
    sweep = [{"ptq": 0.95}, {"ptq": 0.942}, {"ptq": 0.90}, {"ptq": 0.60}]
    assert plots.crossover(sweep, base=0.95, tolerance=0.01) == 2
    assert plots.crossover(sweep[:2], base=0.95, tolerance=0.01) is None
    assert plots.crossover([{"ptq": None}], base=0.95, tolerance=0.01) is None


def test_ptq_vs_qat_draws_both_curves_fp32_the_band_and_the_crossover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = sweep_results(test_split=True)
    qat_w8 = next(r for r in data["runs"] if r["name"] == "qat-w8a8")
    qat_w8.update(result_row("qat-w8a8", "qat", "static", 8, 8, 0.948, 33_000, 0.05, 0.9))
    qat_w8["metric_test"] = 0.938
    seen, unseen = _drawn(
        monkeypatch, plots.ptq_vs_qat, data, tmp_path
    ).axes  # the split the recommendation saw, and the test split
    for ax, shift in ((seen, 0.0), (unseen, 0.01)):
        lines = {line.get_label(): line for line in ax.get_lines()}
        ptq, qat = lines["PTQ (static)"], lines["QAT (from the PTQ start)"]
        assert list(ptq.get_ydata()) == pytest.approx([0.947 - shift, 0.90 - shift])
        assert list(qat.get_ydata()) == pytest.approx([0.948 - shift, 0.945 - shift])
        assert list(lines[f"FP32 {0.95 - shift:.4f}"].get_ydata()) == pytest.approx(
            [0.95 - shift] * 2
        )
        assert [t.get_text() for t in ax.get_xticklabels()] == ["W8A8", "W4A4"]
        # The crossover: W4A4 (x = 1), where PTQ leaves the band.
        cross = lines["crossover: PTQ leaves the band"]
        assert list(cross.get_xdata()) == [1, 1]
        assert any(
            "PTQ stops at W4A4: 5.0 pts below FP32" in t.get_text()
            and "QAT recovers 90 % of the gap" in t.get_text()
            for t in ax.texts
        )
        assert any(p.get_label() == "within 0.01" for p in ax.patches)
    assert "unseen" in unseen.get_title()


def test_importing_the_plots_module_does_not_import_matplotlib() -> None:
    code = (
        "import sys, edgequant, edgequant.report.plots, edgequant.report.render; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
