"""examples/smollm2.yaml and its data module on the real SmolLM2-135M and WikiText-2 (skipped
without ../shared): the windows it reads, and `edgequant compare` through the config on a cut-down
copy of it (slow)."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from edgequant.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def data() -> Iterator[ModuleType]:
    from edgequant.examples.shared import shared_dir

    if shared_dir() is None:
        pytest.skip("../shared (SmolLM2-135M, WikiText-2) is absent; set EDGEQUANT_SHARED")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("smollm2_data")
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("smollm2_data", None)


def test_smollm2_config_reads_perplexity_lower_is_better_and_runs_qat() -> None:
    config = load_config(EXAMPLES / "smollm2.yaml")
    assert config.metric == "perplexity" and config.lower_is_better_metric
    assert config.qat_epochs >= 1 and config.train_data is not None
    assert [r.weight.group_size for r in config.recipes] == [64, 64]


def test_smollm2_windows_calibrate_train_and_evaluate_on_disjoint_text(data: ModuleType) -> None:
    calib = data.calib_batches(count=2, seq_len=64)
    train = data.train_batches(count=3, seq_len=64, skip=2)
    pairs = data.eval_batches(count=2, seq_len=64)
    assert [tuple(b["input_ids"].shape) for b in calib + train] == [(1, 64)] * 5
    ids = torch.cat([b["input_ids"] for b in calib + train])
    assert len({tuple(row.tolist()) for row in ids}) == 5  # training starts after calibration
    (inputs, labels), _ = pairs
    assert torch.equal(inputs["input_ids"], labels) and labels.shape == (1, 64)


@pytest.mark.slow
def test_compare_through_the_smollm2_config_recommends_ptq_or_qat(
    data: ModuleType, tmp_path: Path
) -> None:
    """The config cut down (windows of 128 tokens, 4 to calibrate, 7 to train, 4 to evaluate,
    the INT3 recipe alone), through the command line."""
    from edgequant.cli import main

    shutil.copy(EXAMPLES / "smollm2_data.py", tmp_path / "smollm2_data.py")
    text = (EXAMPLES / "smollm2.yaml").read_text()
    text = text.replace("{count: 16, seq_len: 512}", "{count: 4, seq_len: 128}")
    text = text.replace("{count: 112, seq_len: 512}", "{count: 7, seq_len: 128, skip: 4}")
    text = text.replace("{count: 64, seq_len: 512}", "{count: 4, seq_len: 128}")
    text = text.replace("num_samples: 16", "num_samples: 4")
    start = text.index("  - name: int4-g64")
    text = text[:start] + text[text.index("  - name: int3-g64") :]
    (tmp_path / "smollm2.yaml").write_text(text)
    out = tmp_path / "run"
    assert (
        main(
            [
                "compare",
                "--config",
                str(tmp_path / "smollm2.yaml"),
                "--out",
                str(out),
                "--quick",
                "--quiet",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["lower_is_better"] is True and results["metric"] == "perplexity"
    rows = {r["name"]: r for r in results["runs"]}
    assert set(rows) == {"ptq-weight-only-int3-g64", "qat-int3-g64"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for row in (results["baseline"], *rows.values()):
        assert row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
    qat, ptq = rows["qat-int3-g64"], rows["ptq-weight-only-int3-g64"]
    assert (
        qat["selection"]["heldout_perplexity"][qat["kept_epoch"]]
        <= (qat["selection"]["heldout_perplexity"][0])
    )
    assert ptq["metric_deployed"] > results["baseline"]["metric"]
    assert results["recommendation"]["choice"] in (None, *rows)
