"""eq.compare on a causal LM (a tiny randomly initialised LlamaForCausalLM, no file needed) with
perplexity, a metric where lower is better: the LM export and its verification, the report's
fields (perplexity, file size, tokens per second, peak memory), and a recommendation that reads
the metric's direction. The SmolLM2 config runs in tests/examples (slow)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from toys import LLAMA_VOCAB, lm_recipe, tiny_llama  # tests/toys.py

from edgequant.metrics import next_token_nll
from edgequant.report.compare import Run, compare
from edgequant.report.recommend import recommend

transformers = pytest.importorskip("transformers")


def confident_llama() -> torch.nn.Module:
    """The tiny Llama with its (tied) token table scaled up, so that its next-token
    distributions are peaked and quantizing its weights coarsely costs perplexity."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6.0)
    return model


def sampled_text(model: torch.nn.Module, count: int, tokens: int, seed: int) -> torch.Tensor:
    """Windows sampled from the model itself: on its own samples the FP32 model has the lowest
    expected perplexity of any model (Gibbs' inequality), so quantization error shows as a rise."""
    torch.manual_seed(seed)
    start = torch.randint(0, LLAMA_VOCAB, (count, 1))
    with torch.no_grad():
        return model.generate(
            start,
            do_sample=True,
            top_k=0,
            max_new_tokens=tokens - 1,
            min_new_tokens=tokens - 1,
            pad_token_id=0,
        )


def ppl_fn(windows: torch.Tensor) -> Any:
    def eval_fn(predict: Any) -> float:
        total, count = 0.0, 0
        for ids in windows.split(8):
            nll, n = next_token_nll(predict({"input_ids": ids}), ids)
            total, count = total + nll, count + n
        return math.exp(total / count)

    return eval_fn


def test_compare_on_a_causal_lm_reports_perplexity_speed_and_reads_the_direction() -> None:
    model = confident_llama()
    calib = [{"input_ids": w} for w in sampled_text(model, 8, 32, seed=1).split(4)]
    eval_windows = sampled_text(model, 24, 32, seed=2)
    runs = [
        Run("ptq-int8", "weight_only", lm_recipe(8, None)),
        # Round to nearest (no calibration pipeline): quick, and far from FP32 at 2 bits.
        Run(
            "ptq-int2-g32",
            "weight_only",
            lm_recipe(2, 32, awq=False, clip_search=False, rounding="nearest"),
        ),
    ]
    report = compare(
        model,
        calib,
        ppl_fn(eval_windows),
        runs=runs,
        tolerance=0.01,
        metric="perplexity",
        latency_runs=1,
    )
    results = json.loads(json.dumps(report.results))  # what results.json holds
    assert results["lower_is_better"] is True and "1.01x FP32" in results["tolerance_rule"]
    base = results["baseline"]
    rows = {r["name"]: r for r in results["runs"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for row in (base, *rows.values()):
        assert row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
        assert row["latency_ms"]["bs1"] == pytest.approx(1000 / row["tokens_per_s"])
    int8, int2 = rows["ptq-int8"], rows["ptq-int2-g32"]
    assert int2["size_bytes"] < int8["size_bytes"] < base["size_bytes"]
    for row in (int8, int2):  # deployed: the exported file in ONNX Runtime, verified
        assert row["top1_agreement"] >= 0.99
        assert row["metric_deployed"] == pytest.approx(row["metric_simulated"], rel=0.01)
    # 2 bits raise perplexity past 1.01x FP32; 8 bits stay within it.
    assert int2["metric_deployed"] > 1.01 * base["metric"] >= int8["metric_deployed"]
    rec = report.recommendation
    # The smaller file whose perplexity is worse is not recommended: read as "higher is
    # better", its higher perplexity would pass and its size would win.
    assert rec["choice"] == "ptq-int8" and rec["within_tolerance"] == ["ptq-int8"]
    markdown = report.to_markdown()
    assert "lower is better" in markdown and "tokens/s (bs1, KV cache)" in markdown
    assert "peak memory (MB)" in markdown and "next-token agree" in markdown


def test_recommend_reads_a_lower_is_better_metric() -> None:
    def row(name: str, metric: float, size: int) -> dict[str, Any]:
        return {
            "name": name,
            "family": "ptq",
            "status": "ok",
            "metric_deployed": metric,
            "size_bytes": size,
            "size_ratio": size / 1000,
            "labels_used": False,
        }

    runs = [row("small-worse", 13.0, 100), row("big-close", 10.2, 300), row("mid", 10.29, 200)]
    rec = recommend(10.0, runs, 0.03, lower_is_better=True)
    assert rec["choice"] == "mid" and rec["within_tolerance"] == ["mid", "big-close"]
    assert "1.03x FP32" in rec["why"]
    # The same rows read higher-is-better with an absolute tolerance: every one qualifies.
    assert recommend(10.0, runs, 0.03)["choice"] == "small-worse"
    none = recommend(10.0, [row("a", 11.0, 1), row("b", 12.0, 1)], 0.03, lower_is_better=True)
    assert none["choice"] is None and "the best was a at 11.0000" in none["why"]


def test_compare_checks_the_direction_and_tolerance() -> None:
    model = tiny_llama()
    calib = [{"input_ids": torch.zeros(1, 8, dtype=torch.long)}]
    with pytest.raises(TypeError, match="lower_is_better must be True, False or None"):
        compare(model, calib, lambda p: 1.0, lower_is_better="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tolerance must be a number >= 0 \(a relative rise\)"):
        compare(model, calib, lambda p: 1.0, metric="perplexity", tolerance=-0.1)
    with pytest.raises(ValueError, match=r"tolerance must be a number in \[0, 1\)"):
        compare(model, calib, lambda p: 1.0, metric="accuracy", tolerance=2.0)
