"""The config keys for language models: the perplexity metric (batch by batch), the metric's
direction (lower_is_better) and QAT runs in compare (qat_epochs), each with its bad-input error
naming the file, the line and the key."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from edgequant.config import ConfigError, load_config
from edgequant.config.schema import BATCHED_METRICS, METRICS
from edgequant.metrics import next_token_nll

HELPERS = """
import torch
from torch import nn

class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(16, 16)

    def forward(self, input_ids, attention_mask=None):
        return self.table(input_ids)

def model():
    return Bigram()

def windows(n=4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (n, 8), generator=g)
    return [({"input_ids": ids[i : i + 2]}, ids[i : i + 2]) for i in range(0, n, 2)]

def calib():
    return [inputs for inputs, _ in windows()]
"""


@pytest.fixture(autouse=True)
def _fresh_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "lm_helpers", raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "lm_helpers.py").write_text(HELPERS)
    path = tmp_path / "lm.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


BASE = """
model: lm_helpers:model
calib_data: lm_helpers:calib
eval_data: lm_helpers:windows
"""


def test_perplexity_is_a_lower_is_better_metric_measured_batch_by_batch(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, BASE + "metric: perplexity\ntolerance: 0.03\n"))
    assert config.lower_is_better_metric and config.to_dict()["lower_is_better"] is True
    model = config.build_model()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, ids in config.eval_batches():
            nll, n = next_token_nll(model(**inputs), ids)
            total, count = total + nll, count + n
    assert config.evaluate(model) == pytest.approx(math.exp(total / count))
    assert "perplexity" in BATCHED_METRICS
    outputs = torch.cat([model(**x) for x, _ in config.eval_batches()]).detach()
    labels = torch.cat([y for _, y in config.eval_batches()])
    assert METRICS["perplexity"](outputs, labels) == pytest.approx(config.evaluate(model))


def test_lower_is_better_and_qat_epochs_are_read(tmp_path: Path) -> None:
    text = BASE + "metric: lm_helpers:model\nlower_is_better: true\n"
    text += "train_data: lm_helpers:calib\nqat_epochs: 2\n"
    config = load_config(_write(tmp_path, text))
    assert config.lower_is_better_metric and config.qat_epochs == 2
    plain = load_config(_write(tmp_path, BASE + "metric: accuracy\n"))
    assert not plain.lower_is_better_metric and plain.qat_epochs == 0
    flipped = load_config(_write(tmp_path, BASE + "metric: perplexity\nlower_is_better: false\n"))
    assert not flipped.lower_is_better_metric


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("lower_is_better: yes please\n", r"line 4: lower_is_better: must be true or false"),
        ("lower_is_better: 1\n", r"lower_is_better: must be true or false .*got 1"),
        ("qat_epochs: -1\n", r"line 4: qat_epochs: must be an integer >= 0, got -1"),
        ("qat_epochs: 1.5\n", r"qat_epochs: must be an integer >= 0, got 1.5"),
        ("qat_epochs: 2\n", r"qat_epochs: is 2, but QAT trains on train_data"),
        ("metric: perplexty\n", r"unknown metric 'perplexty'; valid: accuracy, perplexity"),
    ],
)
def test_bad_values_of_the_new_keys_name_the_line_and_key(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE + extra))


def test_compare_runs_one_qat_run_per_recipe_with_qat_epochs() -> None:
    from edgequant.report.runs import runs_for

    runs = runs_for(["w4-weight-only", "w8a8"], qat_epochs=2)
    assert [(r.name, r.family, r.method, r.epochs) for r in runs] == [
        ("ptq-weight-only-w4", "ptq", "weight_only", 0),
        ("qat-w4-weight-only", "qat", "weight_only", 2),
        ("ptq-static-w8a8", "ptq", "static", 0),
        ("qat-w8a8", "qat", "static", 2),
    ]
    with pytest.raises(ValueError, match="qat_epochs must be an int >= 0, got -1"):
        runs_for(["w8a8"], qat_epochs=-1)


def test_a_causal_lm_defaults_to_weight_only_runs() -> None:
    from edgequant.report.runs import default_lm_runs

    runs = default_lm_runs(qat=True)
    assert [(r.name, r.family) for r in runs] == [
        ("ptq-weight-only-int4-g64", "ptq"),
        ("ptq-weight-only-int3-g64", "ptq"),
        ("qat-int3-g64", "qat"),
    ]
    assert all(r.recipe.weight_only and r.recipe.weight.group_size == 64 for r in runs)
    assert [r.name for r in default_lm_runs(qat=False)] == [
        "ptq-weight-only-int4-g64",
        "ptq-weight-only-int3-g64",
    ]
