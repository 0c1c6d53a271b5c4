"""The recommendation of a compare (report/recommend.py): accuracy first, then size, then cost,
then speed, and a plain word when the integer model is slower than FP32."""

from __future__ import annotations

from edgequant.report.compare import recommend


def _row(
    name: str,
    metric: float,
    size: int,
    family: str = "ptq",
    labels: bool = False,
    bs1: float | None = None,
    bs64: float | None = None,
) -> dict:
    row = {
        "name": name,
        "status": "ok",
        "metric_deployed": metric,
        "size_bytes": size,
        "size_ratio": size / 1000,
        "family": family,
        "labels_used": labels,
    }
    if bs1 is not None:
        row["latency_ms"] = {"bs1": bs1, "bs64": bs64}
    return row


def test_recommendation_is_accuracy_first_then_size_then_cost_then_speed() -> None:
    runs = [
        _row("qat-w4a4", 0.95, 100, family="qat", labels=True),
        _row("ptq-w8a8", 0.945, 300),
        _row("ptq-w4", 0.90, 90),  # the smallest, but outside the tolerance
        _row("ptq-w4a8", 0.942, 200),
    ]
    rec = recommend(0.95, runs, tolerance=0.01)
    # Within tolerance, the smallest file wins even when only QAT gets there.
    assert rec["choice"] == "qat-w4a4" and "trained with labels" in rec["why"]
    assert rec["within_tolerance"] == ["qat-w4a4", "ptq-w4a8", "ptq-w8a8"]
    assert recommend(0.95, runs[1:], tolerance=0.01)["choice"] == "ptq-w4a8"
    # At equal size the cheaper to make wins (PTQ, no labels), whatever the timing says ...
    tied = [
        _row("qat-w2a2", 0.95, 100, family="qat", labels=True, bs1=0.01, bs64=1.0),
        _row("ptq-w4a4", 0.945, 100, bs1=0.02, bs64=1.0),
        _row("ptq-w3a3", 0.945, 100, bs1=0.015, bs64=1.0),
    ]
    rec = recommend(0.95, tied, tolerance=0.01)
    # ... and then the faster.
    assert rec["choice"] == "ptq-w3a3" and "tied with ptq-w4a4, qat-w2a2" in rec["why"]
    none = recommend(0.99, runs, tolerance=0.01)
    assert none["choice"] is None and "qat-w4a4" in none["why"]


def test_recommendation_says_plainly_when_the_integer_model_is_slower_than_fp32() -> None:
    fp32 = {"bs1": 0.031, "bs64": 0.9}
    runs = [
        _row("ptq-static-w8a8", 0.95, 300, bs1=0.079, bs64=1.5),
        _row("ptq-dynamic-w8a8", 0.95, 900, bs1=0.030, bs64=0.95),
    ]
    rec = recommend(0.95, runs, tolerance=0.01, baseline_latency_ms=fp32)
    assert rec["choice"] == "ptq-static-w8a8"
    why = rec["why"]
    assert "SLOWER than FP32" in why and "batch 1: 0.079 ms vs FP32 0.031 ms (2.5x)" in why
    assert "quantize" in why.lower() and "overhead" in why  # why it is slower
    # and what would be faster, at each batch size where it is slower
    assert (
        "the faster choice on this CPU is ptq-dynamic-w8a8 at batch 1 and FP32 at batch 64" in why
    )
    assert rec["speed"]["slower_than_fp32"] == ["bs1", "bs64"]
    assert rec["speed"]["fastest"] == {"bs1": "ptq-dynamic-w8a8", "bs64": "fp32"}
    # Within timing noise (10 %) or faster, it is not called slower.
    runs[0]["latency_ms"] = {"bs1": 0.033, "bs64": 0.45}
    why = recommend(0.95, runs, tolerance=0.01, baseline_latency_ms=fp32)["why"]
    assert "SLOWER" not in why and "as fast as FP32 within timing noise (batch 1" in why
    assert "faster than FP32 (batch 64: 0.45 ms vs FP32 0.9 ms (2.0x faster))" in why
    # Without FP32's timings nothing is said about speed.
    assert "Speed" not in recommend(0.95, runs, tolerance=0.01)["why"]
    runs[0]["latency_ms"] = {"bs1": 0.079, "bs64": 1.5}
    why = recommend(0.95, runs[:1], tolerance=0.01, baseline_latency_ms=fp32)["why"]
    assert "the faster choice on this CPU is FP32 (" in why
