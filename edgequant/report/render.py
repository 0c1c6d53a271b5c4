"""The comparison as text: a markdown report a person reads (report.md) and a self-contained HTML
page (report.html: plots embedded, inline CSS, nothing fetched from anywhere)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any

from edgequant.report.direction import is_lower_better
from edgequant.report.plots import TITLES
from edgequant.report.sweep import fmt, same_graph_speed, sweep

# The runs table's columns, in the markdown and the HTML report alike.
COLUMNS = (
    "run",
    "family",
    "bits W/A",
    "deployed",
    "simulated",
    "top-1 agree",
    "size (bytes)",
    "x FP32",
    "latency bs1 / bs64 (ms)",
    "wall (s)",
)


TEST_COLUMN = "test (unseen)"


def _has_test(results: dict[str, Any]) -> bool:
    """Whether the runs carry "metric_test": the metric on a split that neither the
    recommendation nor any setting was chosen on (the demo's MNIST-1D test split)."""
    return "metric_test" in results["baseline"] or any("metric_test" in r for r in results["runs"])


# A causal LM's runs (rows with "tokens_per_s") show decode speed and peak memory in place of
# the latency column, and next-token agreement in place of top-1 agreement.
LM_COLUMNS = ("tokens/s (bs1, KV cache)", "peak memory (MB)")


def _is_lm(results: dict[str, Any]) -> bool:
    return "tokens_per_s" in results["baseline"]


def columns(results: dict[str, Any]) -> tuple[str, ...]:
    """COLUMNS, with TEST_COLUMN after "deployed" where the runs have a test metric, and
    LM_COLUMNS for the latency column where the model is a causal LM."""
    names: tuple[str, ...] = COLUMNS
    if _is_lm(results):
        at = names.index("latency bs1 / bs64 (ms)")
        names = (*names[:at], *LM_COLUMNS, *names[at + 1 :])
        names = tuple("next-token agree" if n == "top-1 agree" else n for n in names)
    if not _has_test(results):
        return names
    at = names.index("deployed") + 1
    return (*names[:at], TEST_COLUMN, *names[at:])


def _speed_cells(row: dict[str, Any], lm: bool) -> list[str]:
    """The latency cell, or a causal LM's tokens per second and peak memory cells."""
    if lm:
        peak = row.get("peak_memory_bytes")
        return [
            fmt(row.get("tokens_per_s"), ".1f"),
            fmt(peak / 1e6 if isinstance(peak, (int, float)) else None, ".1f"),
        ]
    lat = row.get("latency_ms", {})
    return [f"{fmt(lat.get('bs1'), '.3f')} / {fmt(lat.get('bs64'), '.2f')}"]


def _rows(results: dict[str, Any]) -> list[tuple[dict[str, Any] | None, list[str]]]:
    """(run, its cells) for the FP32 baseline (run None) and each run. A failed run has only its
    first three cells (name, family, bits): the rest of its row is its error."""
    base = results["baseline"]
    test = _has_test(results)
    lm = _is_lm(results)
    rows: list[tuple[dict[str, Any] | None, list[str]]] = [
        (
            None,
            [
                "fp32",
                "-",
                "32/32",
                fmt(base["metric"]),
                fmt(base.get("metric_torch")),
                "-",
                str(base["size_bytes"]),
                "1.00",
                *_speed_cells(base, lm),
                fmt(base.get("wall_s"), ".1f"),
            ],
        )
    ]
    if test:
        rows[0][1].insert(4, fmt(base.get("metric_test")))
    for r in results["runs"]:
        bits = f"{r.get('weight_bits') or '-'}/{r.get('act_bits') or '-'}"
        if r.get("status") != "ok":
            rows.append((r, [r["name"], r["family"], bits]))
            continue
        cells = [
            r["name"],
            r["family"],
            bits,
            fmt(r["metric_deployed"]),
            fmt(r.get("metric_simulated")),
            fmt(r.get("top1_agreement")),
            str(r["size_bytes"]),
            f"{r['size_ratio']:.2f}",
            *_speed_cells(r, lm),
            f"{r['wall_s']:.1f}",
        ]
        if test:
            cells.insert(4, fmt(r.get("metric_test")))
        rows.append((r, cells))
    return rows


def table(results: dict[str, Any]) -> str:
    """One row per run: deployed and simulated metric, agreement, size, latency, time."""
    names = columns(results)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for run, cells in _rows(results):
        line = "| " + " | ".join(cells) + " |"
        if run is not None and run.get("status") != "ok":
            line += f" FAILED: {run.get('error', '')[:80]} |" + " |" * (len(names) - len(cells) - 1)
        lines.append(line)
    return "\n".join(lines)


def _recommendation_line(results: dict[str, Any]) -> str:
    rec = results["recommendation"]
    return f"{rec['choice'] or 'none of the methods tried'}. {rec['why']}."


def _metric_note(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    tolerance = float(results["tolerance"])
    direction = (
        f" (lower is better: a run qualifies at {1 + tolerance:g}x FP32 or below)"
        if is_lower_better(results)
        else ""
    )
    speed = (
        "Speed: tokens per second decoding at batch 1 with the KV cache in ONNX Runtime (the "
        "median of a few generations); peak memory: the process's peak resident memory while the session loads "
        "and decodes, above what it held before."
        if _is_lm(results)
        else "Latency: ONNX Runtime, median."
    )
    return (
        f'Metric: {results["metric"]}{direction}, tolerance {results["tolerance"]}. "deployed" '
        'is the exported ONNX model run in ONNX Runtime; "simulated" is the fake-quantized '
        f"PyTorch model. {speed} {env.get('threads', '?')} threads."
    )


def _environment_line(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    return (
        f"Environment: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, "
        f"{env.get('cpu')}."
    )


def _selection_lines(results: dict[str, Any]) -> list[str]:
    """One line per QAT run that recorded which epoch it kept and why."""
    return [
        f"{run['name']}: {run['selection']['why']}."
        for run in results["runs"]
        if run.get("status") == "ok" and isinstance(run.get("selection"), dict)
    ]


def _edge_lines(results: dict[str, Any]) -> list[str]:
    """A line per run written for an edge runtime too (report/edge_runs.py)."""
    lines = []
    for row in results.get("runs", []):
        edge = row.get("edge")
        if not edge:
            continue
        if edge.get("status") != "ok":
            lines.append(f"- {row['name']}: .{edge['format']} failed: {edge.get('error')}")
            continue
        arena = f", arena {edge['arena_bytes']} B" if edge.get("arena_bytes") else ""
        agree = edge.get("top1_agreement")
        lines.append(
            f"- {row['name']}: .{edge['format']} in {edge['runtime']}: "
            f"{results.get('metric', 'metric')} {edge['metric_deployed']:.4f}, "
            f"{edge['size_bytes']} B{arena}, batch 1 {edge['latency_ms'].get('bs1', 0):.3f} ms"
            + (f", top-1 agreement with the simulation {agree:.4f}" if agree is not None else "")
        )
    return lines


def markdown(results: dict[str, Any], summaries: dict[str, str] | None = None) -> str:
    lines = [
        f"# edgequant report: {results['task']}",
        "",
        f"**Recommendation:** {_recommendation_line(results)}",
        "",
        _metric_note(results),
        "",
        table(results),
        "",
    ]
    if results.get("notes"):
        lines += [f"- {note}" for note in results["notes"]] + [""]
    by_bits = sweep(results)
    if by_bits is not None:
        header, rows, summary = by_bits
        lines += ["## PTQ vs QAT by bits", "", summary, ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows] + [""]
    speed = same_graph_speed(results)
    if speed is not None:
        lines += [speed, ""]
    edge = _edge_lines(results)
    if edge:
        lines += ["## In the target's own runtime", ""] + edge + [""]
    selection = _selection_lines(results)
    if selection:
        lines += ["QAT epoch kept, chosen on data held out of train_data:", ""]
        lines += [f"- {line}" for line in selection] + [""]
    lines.append(_environment_line(results))
    if summaries:
        lines += ["", "## What each method quantized", ""]
        for name, text in summaries.items():
            lines += [f"### {name}", "", "```", text, "```", ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ html

# Inline, so that the page is one file that opens anywhere, offline, and can be mailed around.
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1150px; padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.recommendation { background: #eef7ee; border-left: 5px solid #2e7d32; padding: 0.8em 1em; }
.recommendation.none { background: #fff4e5; border-left-color: #ed6c02; }
.recommendation .choice { font-size: 1.25em; font-weight: 600; }
.note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; width: 100%; font-size: 0.88em; margin: 0.8em 0; }
th, td { border: 1px solid #d0d0d0; padding: 0.35em 0.55em; text-align: right; }
th { background: #f0f0f0; }
td:nth-child(-n+3), th:nth-child(-n+3) { text-align: left; white-space: nowrap; }
tr.baseline td { background: #f7f7f7; }
tr.chosen td { background: #e3f4e4; font-weight: 600; }
tr.failed td { background: #fdecea; color: #b00020; }
tr.failed td.error { text-align: left; font-family: ui-monospace, monospace; font-size: 0.95em; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #e0e0e0; }
figcaption { font-weight: 600; margin-bottom: 0.3em; }
.plot-error { color: #b00020; }
details { margin: 0.4em 0; border: 1px solid #e0e0e0; border-radius: 4px; padding: 0.3em 0.7em; }
details summary { cursor: pointer; font-weight: 600; }
details.failed summary { color: #b00020; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
footer { margin-top: 2em; color: #666; font-size: 0.85em; }
"""


def _html_table(results: dict[str, Any]) -> str:
    choice = results["recommendation"].get("choice")
    names = columns(results)
    head = "".join(f"<th>{escape(c)}</th>" for c in names)
    body = []
    for run, cells in _rows(results):
        tds = "".join(f"<td>{escape(c)}</td>" for c in cells)
        if run is None:
            css = "baseline"
        elif run.get("status") != "ok":
            css = "failed"
            tds += (
                f'<td class="error" colspan="{len(names) - len(cells)}">'
                f"FAILED: {escape(str(run.get('error', '')))}</td>"
            )
        else:
            css = "chosen" if run["name"] == choice else "ok"
        body.append(f'<tr class="{css}">{tds}</tr>')
    return (
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>"
    )


def _data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_plots(plots: Mapping[str, str | Path], errors: Mapping[str, str]) -> list[str]:
    parts = []
    for name, path in plots.items():
        title = escape(TITLES.get(name, name))
        parts.append(
            f'<figure id="plot-{escape(name)}"><figcaption>{title}</figcaption>'
            f'<img src="{_data_uri(path)}" alt="{title}"></figure>'
        )
    for name, error in errors.items():
        parts.append(
            f'<p class="plot-error">{escape(TITLES.get(name, name))}: not drawn ({escape(error)})</p>'
        )
    return parts


def _html_details(results: dict[str, Any], summaries: Mapping[str, str]) -> list[str]:
    parts = []
    for run in results["runs"]:
        name = run["name"]
        facts = [
            f"{key.replace('_', ' ')}: {run[key]}"
            for key in ("method", "recipe", "samples_used", "labels_used", "onnx")
            if run.get(key) is not None
        ]
        if run.get("status") != "ok":
            body = f"<pre>{escape(str(run.get('traceback') or run.get('error', '')))}</pre>"
            parts.append(
                f'<details class="failed"><summary>{escape(name)}: FAILED</summary>'
                f'<p class="note">{escape("; ".join(facts))}</p>{body}</details>'
            )
            continue
        text = summaries.get(name)
        body = f"<pre>{escape(text)}</pre>" if text else "<p>(no summary recorded)</p>"
        parts.append(
            f"<details><summary>{escape(name)}</summary>"
            f'<p class="note">{escape("; ".join(facts))}</p>{body}</details>'
        )
    return parts


def html(
    results: dict[str, Any],
    summaries: Mapping[str, str] | None = None,
    plots: Mapping[str, str | Path] | None = None,
    plot_errors: Mapping[str, str] | None = None,
) -> str:
    """report.html: the recommendation and why, the runs table (failed runs in red with their
    error), the plots (PNG files, embedded as data URIs) and each run's quantization summary.

    plots: name -> PNG path (plots.PLOTS' names get their titles); plot_errors: name -> why a
    plot could not be drawn, shown in its place. Every piece of text is HTML-escaped.
    """
    rec = results["recommendation"]
    choice = rec.get("choice")
    rec_css = "recommendation" if choice else "recommendation none"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>edgequant report: {escape(str(results['task']))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>edgequant report: {escape(str(results['task']))}</h1>",
        f'<div class="{rec_css}"><div class="choice">Recommendation: '
        f"{escape(choice or 'none of the methods tried')}</div>"
        f'<div class="why">{escape(str(rec["why"]))}.</div></div>',
        f'<p class="note">{escape(_metric_note(results))}</p>',
        "<h2>Runs</h2>",
        _html_table(results),
    ]
    if results.get("notes"):
        parts.append(
            "<ul>"
            + "".join(f'<li class="note">{escape(str(n))}</li>' for n in results["notes"])
            + "</ul>"
        )
    by_bits = sweep(results)
    if by_bits is not None:
        header, rows, summary = by_bits
        parts += [
            "<h2>PTQ vs QAT by bits</h2>",
            f"<p>{escape(summary)}</p>",
            "<table><thead><tr>"
            + "".join(f"<th>{escape(c)}</th>" for c in header)
            + "</tr></thead><tbody>"
            + "".join(
                "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>" for cells in rows
            )
            + "</tbody></table>",
        ]
        if plots and "ptq_vs_qat" in plots:
            parts.append(_html_plots({"ptq_vs_qat": plots["ptq_vs_qat"]}, {})[0])
    speed = same_graph_speed(results)
    if speed is not None:
        parts.append(f"<p>{escape(speed)}</p>")
    selection = _selection_lines(results)
    if selection:
        parts += [
            '<p class="note">QAT epoch kept, chosen on data held out of train_data:</p>',
            "<ul>"
            + "".join(f'<li class="note">{escape(line)}</li>' for line in selection)
            + "</ul>",
        ]
    rest = {k: v for k, v in (plots or {}).items() if not (by_bits and k == "ptq_vs_qat")}
    if rest or plot_errors:
        parts += ["<h2>Plots</h2>", *_html_plots(rest, plot_errors or {})]
    parts += [
        "<h2>What each method quantized</h2>",
        *_html_details(results, summaries or {}),
        f"<footer>{escape(_environment_line(results))}</footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"
