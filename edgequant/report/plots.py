"""The comparison as pictures (plots/*.png of a saved report), drawn from a results dict.

Every function takes the results file's dict (DESIGN §1) and a folder, draws one PNG with
matplotlib's Agg canvas (no pyplot: no global figure state, no display needed), writes it
atomically and returns its path. Runs whose status is not "ok" have no numbers to draw: they are
left out of the axes and named in the legend as failed, so a reader never mistakes a missing
point for a method that was not tried.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgequant._io import atomic_write_bytes
from edgequant.report.direction import is_lower_better, limit, limit_label

__all__ = [
    "PLOTS",
    "TITLES",
    "bit_sweep",
    "crossover",
    "latency",
    "metric_vs_bits",
    "pareto_front",
    "ptq_vs_qat",
    "size_vs_metric",
]

DPI = 110
# One colour per family, so QAT and mixed-precision runs read apart from PTQ in every plot.
FAMILY_COLORS = {"fp32": "#444444", "ptq": "#1f77b4", "qat": "#d62728", "mixed": "#2ca02c"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _ok(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r.get("status") == "ok"]


def _failed(results: dict[str, Any]) -> list[str]:
    """Legend labels for the runs that failed."""
    return [f"{r['name']}: failed" for r in results["runs"] if r.get("status") != "ok"]


def _text(value: Any) -> str:
    """Text matplotlib draws as given: a "$" would otherwise start mathtext (and an odd number
    of them fails the whole figure)."""
    return str(value).replace("$", r"\$")


def _color(family: str) -> str:
    return FAMILY_COLORS.get(family, "#9467bd")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend(ax: Any, not_drawn: Sequence[str]) -> None:
    """The legend, with each run that has no point as an entry of its own (a grey x)."""
    for label in not_drawn:
        ax.plot([], [], ls="none", marker="x", color="0.5", label=_text(label))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _metric_label(results: dict[str, Any]) -> str:
    arrow = ", lower is better" if is_lower_better(results) else ""
    return _text(f"{results.get('metric', 'metric')} (deployed, ONNX Runtime{arrow})")


def _band(ax: Any, results: dict[str, Any], base: float, tolerance: float) -> None:
    """The tolerance band beside FP32's line: below it for a higher-is-better metric, above it
    for a lower-is-better one (report.direction)."""
    bound = limit(base, tolerance, is_lower_better(results))
    ax.axhspan(
        min(base, bound),
        max(base, bound),
        color="#2ca02c",
        alpha=0.12,
        label=f"within {tolerance:g}"
        if not is_lower_better(results)
        else f"within {limit_label(tolerance, True)}",
    )


def metric_vs_bits(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Deployed metric against weight bits, one line per family, method and activation bits
    (e.g. "ptq static A8"), the FP32 baseline and the tolerance band; metric_vs_bits.png."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    base = results["baseline"]["metric"]
    tolerance = results.get("tolerance")
    ax.axhline(base, color=_color("fp32"), ls="--", lw=1, label=f"FP32 {base:.4f}")
    if tolerance is not None:
        _band(ax, results, base, tolerance)
    series: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    no_bits: list[str] = []
    for run in _ok(results):
        if isinstance(run.get("weight_bits"), (int, float)):
            key = (run["family"], run["method"], run.get("act_bits") or 0)
            series.setdefault(key, []).append(run)
        else:
            no_bits.append(run["name"])
    bits: set[float] = set()
    styles = ("-", "--", "-.", ":")
    per_family: dict[str, int] = {}
    for index, ((family, method, act_bits), runs) in enumerate(sorted(series.items())):
        runs = sorted(runs, key=lambda r: r["weight_bits"])
        bits.update(r["weight_bits"] for r in runs)
        # Series meet at the same bit widths: a small sideways shift keeps each point visible.
        shift = 0.1 * (index - (len(series) - 1) / 2)
        nth = per_family[family] = per_family.get(family, -1) + 1
        what = f"{method} A{act_bits}" if act_bits else "weight-only"
        ax.plot(
            [r["weight_bits"] + shift for r in runs],
            [r["metric_deployed"] for r in runs],
            marker=MARKERS[index % len(MARKERS)],
            ls=styles[nth % len(styles)],
            color=_color(family),
            alpha=0.9,
            label=_text(f"{family} {what}"),
        )
    if bits:
        ax.set_xticks(sorted(bits))
        ax.set_xlim(min(bits) - 0.7, max(bits) + 0.7)
    ax.set_xlabel("weight bits")
    ax.set_ylabel(_metric_label(results))
    ax.grid(alpha=0.3)
    ax.set_title(
        _text(f"{results.get('task', '')}: {results.get('metric', 'metric')} vs weight bits")
    )
    _legend(ax, _failed(results) + [f"{name}: no single bit width" for name in no_bits])
    return _save(fig, Path(out_dir) / "metric_vs_bits.png")


def pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool = False) -> list[int]:
    """Indices of the points (size, metric) that no other point beats: none is at most as large
    with a metric at least as good (as high; as low where lower is better), one of the two
    strictly. Sorted by size."""
    sign = -1.0 if lower_is_better else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


# Where a point's label may go, in offset points from the point, and its alignment: right of
# the point first, then above, below, and the same on the left.
_LABEL_SPOTS = (
    (7, -3, "left"),
    (6, 6, "left"),
    (6, -12, "left"),
    (-7, -3, "right"),
    (-6, 6, "right"),
    (-6, -12, "right"),
)


def _place_labels(fig: Any, ax: Any, labels: list[Any], xy: Sequence[tuple[float, float]]) -> None:
    """Move each point's label to the first spot of _LABEL_SPOTS where it covers no other point,
    no label placed before it and stays inside the axes (runs of similar size and metric would
    otherwise write their names over each other); the first spot when none is free."""
    fig.canvas.draw()  # lays the figure out, so that the pixel positions below are final
    renderer = fig.canvas.get_renderer()
    pixels = ax.transData.transform(xy)
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for index, label in enumerate(labels):
        for dx, dy, align in (*_LABEL_SPOTS, _LABEL_SPOTS[0]):
            label.set_position((dx, dy))
            label.set_horizontalalignment(align)
            box = label.get_window_extent(renderer)
            padded = box.expanded(1.0, 1.0).padded(4)
            free = (
                frame.containsx(box.x0)
                and frame.containsx(box.x1)
                and frame.containsy(box.y0)
                and frame.containsy(box.y1)
                and not any(box.overlaps(other) for other in placed)
                and not any(
                    padded.contains(px, py) for j, (px, py) in enumerate(pixels) if j != index
                )
            )
            if free:
                break
        placed.append(label.get_window_extent(renderer))


def size_vs_metric(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Deployed metric against exported file size, FP32 included, the Pareto front (smallest
    file for its metric) drawn as a staircase and ringed; size_vs_metric.png."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    base = results["baseline"]
    points = [("fp32", "fp32", base["size_bytes"], base["metric"])]
    points += [
        (r["name"], r["family"], r["size_bytes"], r["metric_deployed"]) for r in _ok(results)
    ]
    unit, divisor = ("MB", 1e6) if max(p[2] for p in points) >= 2e6 else ("kB", 1e3)
    xy = [(size / divisor, metric) for _, _, size, metric in points]
    front = pareto_front(xy, is_lower_better(results))
    front_x, front_y = [xy[i][0] for i in front], [xy[i][1] for i in front]
    ax.plot(
        front_x, front_y, color="0.6", lw=1, drawstyle="steps-post", zorder=1, label="Pareto front"
    )
    ax.scatter(
        front_x, front_y, s=170, facecolors="none", edgecolors="#ff7f0e", linewidths=1.5, zorder=3
    )
    seen: set[str] = set()
    labels = []
    for (name, family, _, _), (x, y) in zip(points, xy, strict=True):
        ax.scatter(
            [x],
            [y],
            color=_color(family),
            s=40,
            zorder=4,
            label=None if family in seen else _text(family),
        )
        seen.add(family)
        labels.append(
            ax.annotate(_text(name), (x, y), textcoords="offset points", xytext=(7, -3), fontsize=7)
        )
    tolerance = results.get("tolerance")
    if tolerance is not None:
        lower = is_lower_better(results)
        ax.axhline(
            limit(base["metric"], tolerance, lower),
            color="#2ca02c",
            ls=":",
            lw=1,
            label=limit_label(tolerance, lower),
        )
    ax.set_xlim(0, max(x for x, _ in xy) * 1.2)  # from zero: sizes read as fractions of FP32
    ax.set_xlabel(f"exported file size ({unit})")
    ax.set_ylabel(_metric_label(results))
    ax.grid(alpha=0.3)
    ax.set_title(
        _text(
            f"{results.get('task', '')}: size vs {results.get('metric', 'metric')} "
            "(ringed: Pareto front)"
        )
    )
    _legend(ax, _failed(results))
    _place_labels(fig, ax, labels, xy)
    return _save(fig, Path(out_dir) / "size_vs_metric.png")


def _batch_size(key: str) -> int:
    digits = key.removeprefix("bs")
    return int(digits) if digits.isdigit() else 1 << 30


def latency(results: dict[str, Any], out_dir: str | Path) -> Path:
    """ONNX Runtime latency per run, one panel per batch size (bs1, bs64: their scales differ
    by ten times or more), FP32 first; latency.png."""
    base = results["baseline"]
    rows = [("fp32", "fp32", base.get("latency_ms") or {})]
    rows += [(r["name"], r["family"], r.get("latency_ms") or {}) for r in _ok(results)]
    keys = sorted({k for _, _, lat in rows for k in lat}, key=lambda k: (_batch_size(k), k))
    failed = _failed(results)
    fig = _figure(7.0, max(2.6, 1.4 + 0.32 * (len(rows) + len(failed))))
    axes = fig.subplots(1, max(1, len(keys)), sharey=True, squeeze=False)[0]
    positions = list(range(len(rows)))
    for ax, key in zip(axes, keys, strict=False):
        # NaN, not 0, where a run has no timing for this batch size: no bar rather than a fast one.
        values = [float(lat.get(key, float("nan"))) for _, _, lat in rows]
        ax.barh(positions, values, color=[_color(f) for _, f, _ in rows])
        for pos, value in zip(positions, values, strict=True):
            text = "-" if value != value else f"{value:.3g}"
            ax.annotate(
                text,
                (0 if value != value else value, pos),
                textcoords="offset points",
                xytext=(3, -3),
                fontsize=7,
            )
        ax.set_title(f"batch {key.removeprefix('bs')}", fontsize=10)
        ax.set_xlabel("ms (median)")
        ax.margins(x=0.2)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(positions, [_text(name) for name, _, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    if failed:
        handles = [axes[0].plot([], [], ls="none", marker="x", color="0.5")[0] for _ in failed]
        fig.legend(
            handles,
            [_text(f) for f in failed],
            loc="outside lower center",
            ncols=min(3, len(failed)),
            fontsize=8,
            frameon=False,
        )
    fig.suptitle(_text(f"{results.get('task', '')}: latency in ONNX Runtime"), fontsize=11)
    return _save(fig, Path(out_dir) / "latency.png")


def bit_sweep(results: dict[str, Any], key: str = "metric_deployed") -> list[dict[str, Any]]:
    """The bit widths at which both PTQ (static, or weight-only for a run without activation
    bits) and QAT ran (status ok), most bits first: one row each with "label" ("W4A4", or "W3"
    weight-only), "weight_bits", "act_bits", "ptq" and "qat" (the runs' `key`, None where a run
    lacks it) and the two runs' names. Other methods are left out."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for run in _ok(results):
        family = run.get("family")
        w, a = run.get("weight_bits"), run.get("act_bits")
        method = "static" if isinstance(a, int) else "weight_only"
        is_ptq = family == "ptq" and run.get("method") == method
        if not (is_ptq or family == "qat"):
            continue
        if not isinstance(w, int) or not (isinstance(a, int) or a is None):
            continue
        label = f"W{w}A{a}" if a is not None else f"W{w}"
        side = "ptq" if is_ptq else "qat"
        row = found.setdefault((w, a or 0), {"label": label, "weight_bits": w, "act_bits": a})
        row[side], row[f"{side}_name"] = run.get(key), run["name"]
    rows = [r for r in found.values() if "ptq_name" in r and "qat_name" in r]
    return sorted(rows, key=lambda r: (-r["weight_bits"], -(r["act_bits"] or 0)))


def crossover(
    rows: Sequence[dict[str, Any]], base: float, tolerance: float, lower_is_better: bool = False
) -> int | None:
    """Index of the first row of bit_sweep (most bits first) where PTQ leaves the tolerance
    (report.direction.limit), after holding at every wider width: where PTQ stops and QAT has
    to take over. None when PTQ holds everywhere (or has no value)."""
    bound = limit(base, tolerance, lower_is_better)
    for index, row in enumerate(rows):
        value = row.get("ptq")
        if not isinstance(value, (int, float)):
            continue
        if (value > bound) if lower_is_better else (value < bound):
            return index
    return None


def ptq_vs_qat(results: dict[str, Any], out_dir: str | Path) -> Path | None:
    """PTQ vs QAT by bits: static PTQ and QAT at each bit width both ran at, most bits on the
    left, with the FP32 line, the tolerance band below it and the crossover (the first width
    where PTQ leaves the band) marked. One panel per split: the deployed metric the
    recommendation saw and, where the runs carry "metric_test", the test split it did not see;
    ptq_vs_qat.png; None (nothing drawn) when no bit width has both."""
    if not bit_sweep(results):
        (Path(out_dir) / "ptq_vs_qat.png").unlink(missing_ok=True)
        return None
    panels = [("metric_deployed", "metric", "deployed: what the recommendation saw")]
    if any("metric_test" in r for r in _ok(results)):
        panels.append(("metric_test", "metric_test", "test split: unseen by the recommendation"))
    tolerance = float(results.get("tolerance") or 0.0)
    fig = _figure(5.0 * len(panels) + 1.0, 4.3)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (key, base_key, title) in zip(axes, panels, strict=True):
        rows = bit_sweep(results, key)
        base = results["baseline"].get(base_key, results["baseline"]["metric"])
        xs = list(range(len(rows)))
        ax.axhline(base, color=_color("fp32"), ls="--", lw=1, label=f"FP32 {base:.4f}")
        _band(ax, results, base, tolerance)
        for family, marker in (("ptq", "o"), ("qat", "s")):
            points = [
                (x, r[family]) for x, r in zip(xs, rows, strict=True) if r[family] is not None
            ]
            ax.plot(
                [x for x, _ in points],
                [y for _, y in points],
                marker=marker,
                color=_color(family),
                label="PTQ (static)" if family == "ptq" else "QAT (from the PTQ start)",
            )
            for x, y in points:
                ax.annotate(
                    f"{y:.3f}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(6, -10 if family == "ptq" else 5),
                    fontsize=7,
                    color=_color(family),
                )
        lower = is_lower_better(results)
        cross = crossover(rows, base, tolerance, lower)
        if cross is not None:
            row = rows[cross]
            ax.axvline(
                cross, color="#ff7f0e", lw=1.5, ls=":", label="crossover: PTQ leaves the band"
            )
            gap = row["ptq"] - base if lower else base - row["ptq"]
            text = (
                f"PTQ stops at {row['label']}: {row['ptq'] / base:.3g}x FP32"
                if lower
                else f"PTQ stops at {row['label']}: {100 * gap:.1f} pts below FP32"
            )
            if row["qat"] is not None and gap > 0:
                share = (row["qat"] - row["ptq"]) / (base - row["ptq"])
                text += f"\nQAT recovers {100 * share:.0f} % of the gap"
            ax.annotate(
                _text(text),
                (cross, limit(base, tolerance, lower)),
                textcoords="offset points",
                xytext=(-6, -28),
                ha="right" if cross > 0 else "left",
                fontsize=8,
                color="#b35900",
            )
        ax.set_xticks(xs, [r["label"] for r in rows])
        ax.set_xlim(-0.4, len(rows) - 0.6)
        ax.set_xlabel("bits (weights / activations; first and last layers as the recipe sets)")
        ax.set_title(_text(title), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(_metric_label(results))
    _legend(axes[-1], _failed(results))
    fig.suptitle(_text(f"{results.get('task', '')}: PTQ vs QAT by bits"), fontsize=11)
    return _save(fig, Path(out_dir) / "ptq_vs_qat.png")


# name -> plot function writing out_dir/<name>.png, or returning None where the results have
# nothing for it to show; Report.save draws each (a new plot is one function and one line here,
# and a title below).
PLOTS: dict[str, Callable[[dict[str, Any], str | Path], Path | None]] = {
    "ptq_vs_qat": ptq_vs_qat,
    "metric_vs_bits": metric_vs_bits,
    "size_vs_metric": size_vs_metric,
    "latency": latency,
}
TITLES = {
    "ptq_vs_qat": "PTQ vs QAT by bits",
    "metric_vs_bits": "Metric vs weight bits",
    "size_vs_metric": "Size vs metric (Pareto front)",
    "latency": "Latency in ONNX Runtime",
}
