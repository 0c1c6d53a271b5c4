"""edgequant compare --config on a causal LM (a tiny random LlamaForCausalLM): the perplexity
metric batch by batch, a QAT run per recipe from qat_epochs, and the LM columns of what it
prints and saves. The SmolLM2 config itself: tests/examples/test_smollm2_config.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgequant.cli import main

pytest.importorskip("transformers")

LM_MODULE = """\
import torch
from toys import LLAMA_VOCAB, tiny_llama  # tests/toys.py


def model():
    return tiny_llama()


def _ids(count, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, LLAMA_VOCAB, (count, 16), generator=g)


def calib():
    return [{"input_ids": w} for w in _ids(4, 1).split(2)]


def train():
    return [{"input_ids": w} for w in _ids(8, 2).split(2)]


def windows():
    return [({"input_ids": w}, w) for w in _ids(4, 3).split(2)]
"""

CONFIG = """\
task: tiny-lm
model: lm_data:model
calib_data: lm_data:calib
eval_data: lm_data:windows
train_data: lm_data:train
metric: perplexity
tolerance: 0.5
recipes:
  - name: int8
    weight: {bits: 8, granularity: channel, axis: 0}
    activation: null
qat_epochs: 1
"""


@pytest.mark.slow  # about 15 s: two LM exports, QAT, three decode-speed processes
def test_compare_config_on_a_causal_lm_runs_ptq_and_qat_with_perplexity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(__import__("sys").modules, "lm_data", raising=False)
    (tmp_path / "lm_data.py").write_text(LM_MODULE)
    (tmp_path / "lm.yaml").write_text(CONFIG)
    out = tmp_path / "run"
    assert (
        main(["compare", "--config", str(tmp_path / "lm.yaml"), "--out", str(out), "--quick"]) == 0
    )
    printed = capsys.readouterr().out
    assert "tokens/s (bs1, KV cache)" in printed and "Recommendation:" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "perplexity" and results["lower_is_better"] is True
    rows = {r["name"]: r for r in results["runs"]}
    assert list(rows) == ["ptq-weight-only-int8", "qat-int8"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    qat = rows["qat-int8"]
    assert qat["family"] == "qat" and qat["selection"]["against"].startswith("next tokens")
    assert len(qat["selection"]["heldout_perplexity"]) == 2  # the start and one epoch
    # Near the vocabulary size (256): a random model on random tokens.
    assert 100 < results["baseline"]["metric"] < 1000
    for row in rows.values():
        assert row["metric_deployed"] == pytest.approx(row["metric_simulated"], rel=0.01)
    assert results["recommendation"]["choice"] in rows
