"""The report's "PTQ vs QAT by bits" section: at each bit width both static PTQ and QAT ran at,
their metric, the gap to FP32 and the share of it QAT recovers, a sentence naming where PTQ
stops, and a sentence on whether each PTQ/QAT pair is one integer graph and their speed."""

from __future__ import annotations

from typing import Any, NamedTuple

from edgequant.report.direction import gap_to_fp32, is_lower_better, tolerance_rule, within
from edgequant.report.plots import bit_sweep, crossover


def fmt(value: Any, spec: str = ".4f") -> str:
    """A table cell: the value in `spec`, "-" where there is none."""
    return "-" if value is None else format(value, spec)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _worse(gap: float, lower: bool) -> str:
    return f"{gap:.3g} above FP32" if lower else f"{_pct(gap)} points below FP32"


def _better(gain: float, lower: bool) -> str:
    return f"{gain:.3g}" if lower else _pct(gain)


def _header(results: dict[str, Any], test: bool, lower: bool) -> list[str]:
    split = "test" if test else "deployed"
    unit = results.get("metric", "metric") if lower else "pts"
    header = ["bits", "PTQ (seen)", "QAT (seen)"]
    if test:
        header += ["PTQ (test)", "QAT (test)"]
    return header + [f"PTQ gap to FP32 ({split}, {unit})", "recovered by QAT", "QAT epoch kept"]


class _Sweep(NamedTuple):
    """What the table and the summary read: the results, the rows on the data the
    recommendation saw, the rows on the judged split (the test split where there is one) with
    FP32's metric there, whether that split is the test split, and whether lower is better."""

    results: dict[str, Any]
    seen: list[dict[str, Any]]
    judged: list[dict[str, Any]]
    judged_base: float
    test: bool
    lower: bool


def _rows(sweep: _Sweep) -> list[list[str]]:
    """One row of cells per bit width: the metrics seen (and on the test split), the PTQ gap to
    FP32 and the share QAT recovers on the judged split, and the QAT epoch kept."""
    results, seen, judged, judged_base, test, lower = sweep
    kept = {r["name"]: r.get("kept_epoch") for r in results["runs"] if r.get("family") == "qat"}
    # A gap smaller than this is no gap to recover (half a point; half a percent of FP32 where
    # lower is better).
    least = 0.005 * abs(judged_base) if lower else 0.005
    rows = []
    for row, judged_row in zip(seen, judged, strict=True):
        cells = [row["label"], fmt(row["ptq"]), fmt(row["qat"])]
        if test:
            cells += [fmt(judged_row["ptq"]), fmt(judged_row["qat"])]
        ptq, qat = judged_row["ptq"], judged_row["qat"]
        gap = gap_to_fp32(judged_base, ptq, lower) if isinstance(ptq, (int, float)) else None
        cells.append("-" if gap is None else (fmt(gap, ".3g") if lower else _pct(gap)))
        cells.append(
            f"{100 * gap_to_fp32(qat, ptq, lower) / gap:.0f} %"
            if gap is not None and gap > least and isinstance(qat, (int, float))
            else "-"
        )
        epoch = kept.get(row["qat_name"])
        cells.append("-" if epoch is None else str(epoch))
        rows.append(cells)
    return rows


def _summary(sweep: _Sweep) -> str:
    """Where PTQ stops holding within tolerance of FP32 (plots.crossover) on the data the
    recommendation saw, and from there what QAT recovers of each gap on the judged split."""
    results, seen, judged, judged_base, test, lower = sweep
    base = results["baseline"]
    tolerance = float(results.get("tolerance") or 0.0)
    rule = f"{tolerance:g}" if not lower else tolerance_rule(tolerance, lower)
    cross = crossover(seen, base["metric"], tolerance, lower)
    if cross is None:
        return (
            f"PTQ stays within {rule} of FP32 at every bit width tried, down to "
            f"{seen[-1]['label']}: QAT is not needed here."
        )
    row, judged_row = seen[cross], judged[cross]
    held = f"PTQ holds within {rule} of FP32 down to {seen[cross - 1]['label']}; " if cross else ""
    verb = "rises" if lower else "falls"
    summary = (
        f"{held}at {row['label']} it {verb} "
        f"{_worse(gap_to_fp32(base['metric'], row['ptq'], lower), lower)}"
        " on the data the recommendation saw"
        + (
            " and QAT stays within tolerance"
            if isinstance(row["qat"], (int, float))
            and within(row["qat"], base["metric"], tolerance, lower)
            else ""
        )
        + ". "
    )
    gaps = [
        (
            r["label"],
            gap_to_fp32(judged_base, r["ptq"], lower),
            gap_to_fp32(r["qat"], r["ptq"], lower),
        )
        for r in judged[cross:]
        if isinstance(r["ptq"], (int, float)) and isinstance(r["qat"], (int, float))
    ]
    summary += (
        "On the " + ("test split, which nothing was chosen on" if test else "same data") + ": "
    )
    summary += (
        "; ".join(
            f"{label} PTQ {_worse(gap, lower)}, QAT recovers {_better(gain, lower)} "
            f"({100 * gain / gap:.0f} % of the gap)"
            for label, gap, gain in gaps
            if gap > 0
        )
        or f"PTQ is not {'above' if lower else 'below'} FP32 at {judged_row['label']}"
    )
    return summary + "."


def sweep(results: dict[str, Any]) -> tuple[list[str], list[list[str]], str] | None:
    """PTQ vs QAT by bits as (header, rows, summary): at each bit width both static PTQ and
    QAT ran at, their metric on the split the recommendation saw and, where present, on the
    unseen test split; the gap to FP32 and the share of it QAT recovers, on the test split
    where there is one; and a sentence naming where PTQ stops (plots.crossover). None when no
    bit width has both."""
    seen = bit_sweep(results)
    if not seen:
        return None
    base = results["baseline"]
    test = "metric_test" in base
    judged = bit_sweep(results, "metric_test") if test else seen
    judged_base = base["metric_test"] if test else base["metric"]
    lower = is_lower_better(results)
    parts = _Sweep(results, seen, judged, judged_base, test, lower)
    return _header(results, test, lower), _rows(parts), _summary(parts)


def same_graph_speed(results: dict[str, Any]) -> str | None:
    """A sentence on results["qat_vs_ptq_speed"] (the demo's interleaved timing of the PTQ and
    QAT export at each bit width): whether each pair is the same integer graph, and QAT's
    latency as a ratio of PTQ's per batch size. None when the results have no such pairs."""
    pairs = results.get("qat_vs_ptq_speed")
    if not pairs:
        return None
    parts = []
    for pair in pairs:
        ratios = ", ".join(
            f"{pair['ratio_qat_to_ptq'][key]:.2f}x at batch {key[2:]}"
            for key in sorted(pair["ratio_qat_to_ptq"], key=lambda k: int(k[2:]))
        )
        graph = "the same integer graph" if pair["same_graph"] else "DIFFERENT graphs"
        parts.append(f"{pair['bits']}: {graph}, QAT / PTQ latency {ratios}")
    count = pairs[0].get("rounds", 1)
    rounds = f"; the median of {count} rounds" if count > 1 else ""
    return (
        "QAT costs nothing at inference when its export is the PTQ export's graph with other "
        f"integers in it; each pair timed interleaved, run by run ({pairs[0]['runs']} runs per "
        f"batch size{rounds}): " + "; ".join(parts) + "."
    )


__all__ = ["fmt", "same_graph_speed", "sweep"]
