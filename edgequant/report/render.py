"""The comparison as text: a markdown report a person reads (report.md)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, Any]) -> str:
    """One row per run: deployed and simulated metric, agreement, size, latency, time."""
    base = results["baseline"]
    header = ("| run | family | bits W/A | deployed | simulated | top-1 agree | size (bytes) | x FP32 "
              "| latency bs1 / bs64 (ms) | wall (s) |")
    rows = [header, "|" + "---|" * 10]
    lat = base.get("latency_ms", {})
    rows.append(f"| fp32 | - | 32/32 | {_fmt(base['metric'])} | {_fmt(base.get('metric_torch'))} | - | "
                f"{base['size_bytes']} | 1.00 | {_fmt(lat.get('bs1'), '.3f')} / {_fmt(lat.get('bs64'), '.2f')} "
                f"| {_fmt(base.get('wall_s'), '.1f')} |")
    for r in results["runs"]:
        bits = f"{r.get('weight_bits') or '-'}/{r.get('act_bits') or '-'}"
        if r.get("status") != "ok":
            rows.append(f"| {r['name']} | {r['family']} | {bits} | FAILED: {r.get('error', '')[:80]} "
                        "| | | | | | |")
            continue
        lat = r.get("latency_ms", {})
        rows.append(f"| {r['name']} | {r['family']} | {bits} | {_fmt(r['metric_deployed'])} | "
                    f"{_fmt(r.get('metric_simulated'))} | {_fmt(r.get('top1_agreement'))} | {r['size_bytes']} | "
                    f"{r['size_ratio']:.2f} | {_fmt(lat.get('bs1'), '.3f')} / {_fmt(lat.get('bs64'), '.2f')} | "
                    f"{r['wall_s']:.1f} |")
    return "\n".join(rows)


def markdown(results: dict[str, Any], summaries: dict[str, str] | None = None) -> str:
    rec = results["recommendation"]
    env = results.get("environment", {})
    lines = [
        f"# edgequant report: {results['task']}",
        "",
        f"**Recommendation:** {rec['choice'] or 'none of the methods tried'}. {rec['why']}.",
        "",
        f"Metric: {results['metric']}, tolerance {results['tolerance']}. \"deployed\" is the exported ONNX model "
        "run in ONNX Runtime; \"simulated\" is the fake-quantized PyTorch model. Latency: ONNX Runtime, "
        f"{env.get('threads', '?')} threads, median.",
        "",
        table(results),
        "",
        f"Environment: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, {env.get('cpu')}.",
    ]
    if summaries:
        lines += ["", "## What each method quantized", ""]
        for name, text in summaries.items():
            lines += [f"### {name}", "", "```", text, "```", ""]
    return "\n".join(lines) + "\n"
