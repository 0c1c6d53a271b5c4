"""recommend(): the cheapest method within tolerance of FP32 (the metric first, in its direction,
then size, then cost, then speed), and what the recommendation says about speed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from edgequant.report.direction import tolerance_rule, within

# An integer model counts as slower (or faster) than FP32 only beyond this ratio of their
# median latencies: on a shared 2-core machine, medians of the same file move by 5-10 %.
SPEED_MARGIN = 1.10


def _latency(row: Mapping[str, Any], key: str) -> float | None:
    value = (row.get("latency_ms") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _speed_note(
    pick: Mapping[str, Any], ok: list[dict[str, Any]], baseline_latency_ms: Mapping[str, float]
) -> tuple[str, dict[str, Any]]:
    """(sentence, facts) on the pick's speed against FP32 at each batch size both were timed
    at: says plainly where it is slower, why, and which model that meets the tolerance (FP32
    included) is the fastest there."""
    keys = sorted(
        (k for k in baseline_latency_ms if _latency(pick, k) is not None),
        key=lambda k: int(k[2:]) if k[2:].isdigit() else 1 << 30,
    )
    if not keys:
        return "", {}
    facts: dict[str, Any] = {"vs_fp32": {}, "fastest": {}}
    slower, faster, same = [], [], []
    for key in keys:
        fp32 = float(baseline_latency_ms[key])
        own = cast(float, _latency(pick, key))
        ratio = own / fp32 if fp32 > 0 else float("inf")
        facts["vs_fp32"][key] = ratio
        timed = [("fp32", fp32)] + [
            (r["name"], cast(float, _latency(r, key))) for r in ok if _latency(r, key) is not None
        ]
        facts["fastest"][key] = min(timed, key=lambda t: t[1])[0]
        text = f"batch {key[2:]}: {own:.3g} ms vs FP32 {fp32:.3g} ms"
        if ratio > SPEED_MARGIN:
            slower.append(f"{text} ({ratio:.1f}x)")
        elif ratio < 1 / SPEED_MARGIN:
            faster.append(f"{text} ({1 / ratio:.1f}x faster)")
        else:
            same.append(text)
    facts["slower_than_fp32"] = [k for k in keys if facts["vs_fp32"][k] > SPEED_MARGIN]
    parts = []
    if faster:
        parts.append(
            f"in ONNX Runtime on this machine it is faster than FP32 ({'; '.join(faster)})"
        )
    if same:
        parts.append(f"as fast as FP32 within timing noise ({'; '.join(same)})")
    if slower:
        winners = {k: facts["fastest"][k] for k in facts["slower_than_fp32"]}
        label = {name: "FP32" if name == "fp32" else name for name in winners.values()}
        if len(set(winners.values())) == 1:
            faster_choice = label[next(iter(winners.values()))]
        else:
            faster_choice = " and ".join(f"{label[n]} at batch {k[2:]}" for k, n in winners.items())
        parts.append(
            f"it is SLOWER than FP32 in ONNX Runtime on this machine ({'; '.join(slower)}): in a "
            "model this small the time goes to the QuantizeLinear/DequantizeLinear nodes and to "
            "per-kernel overhead, not to the multiply-adds that integer kernels speed up, so what "
            "the integer model buys here is its size, not speed; where speed is what matters, "
            f"the faster choice on this CPU is {faster_choice} (integer models pay off on larger "
            "layers, or on integer-only hardware such as the tflite-int8 and mcu-int8 targets)"
        )
    return "; ".join(parts), facts


def recommend(
    baseline_metric: float,
    runs: list[dict[str, Any]],
    tolerance: float,
    baseline_latency_ms: Mapping[str, float] | None = None,
    lower_is_better: bool = False,
) -> dict[str, Any]:
    """The run to deploy: the metric first, then size, then speed.

    Only runs whose deployed metric is within `tolerance` of the FP32 baseline qualify
    (report.direction: an absolute drop, or for a lower-is-better metric a relative rise). Of
    those, the smallest file; at equal size, the cheaper to make (no labels before labels, PTQ
    before QAT), then the faster at the smallest batch size timed. With baseline_latency_ms
    (FP32's latency_ms), `why` also compares the pick's speed with FP32's and says plainly when
    it is slower and which model would be faster ("speed" holds the ratios).
    """
    rule = tolerance_rule(tolerance, lower_is_better)
    ok = [
        r
        for r in runs
        if r.get("status") == "ok"
        and within(r["metric_deployed"], baseline_metric, tolerance, lower_is_better)
    ]
    if not ok:
        sign = -1.0 if lower_is_better else 1.0
        best = max(
            (r for r in runs if r.get("status") == "ok"),
            key=lambda r: sign * r["metric_deployed"],
            default=None,
        )
        why = (
            f"no method came within tolerance ({rule}) of the FP32 baseline "
            f"({baseline_metric:.4f})"
            + (f"; the best was {best['name']} at {best['metric_deployed']:.4f}" if best else "")
        )
        return {"choice": None, "why": why, "within_tolerance": []}
    first_key = min(
        {k for r in ok for k in (r.get("latency_ms") or {})},
        key=lambda k: int(k[2:]) if k[2:].isdigit() else 1 << 30,
        default="bs1",
    )
    ok.sort(
        key=lambda r: (
            r["size_bytes"],
            bool(r["labels_used"]),
            r["family"] != "ptq",
            _latency(r, first_key) or float("inf"),
        )
    )
    pick = ok[0]
    why = (
        f"{pick['name']} deploys at {pick['metric_deployed']:.4f} in ONNX Runtime, within "
        f"tolerance ({rule}) of the FP32 baseline ({baseline_metric:.4f})"
        + ("; it needs no labels" if not pick["labels_used"] else "; it was trained with labels")
        + f", and its file is {pick['size_bytes']} bytes ({pick['size_ratio']:.2f}x FP32), the "
        f"smallest of the {len(ok)} methods within tolerance"
    )
    same_size = [r["name"] for r in ok[1:] if r["size_bytes"] == pick["size_bytes"]]
    if same_size:
        why += f" (tied with {', '.join(same_size)}: the cheaper to make, then the faster, wins)"
    result: dict[str, Any] = {
        "choice": pick["name"],
        "why": why,
        "within_tolerance": [r["name"] for r in ok],
    }
    if baseline_latency_ms:
        note, facts = _speed_note(pick, ok, baseline_latency_ms)
        if note:
            result["why"] += f". Speed: {note}"
            result["speed"] = facts
    return result
