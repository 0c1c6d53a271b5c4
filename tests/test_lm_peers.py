"""benchmarks/_lm_peers.py: a peer whose package is absent, or that cannot express a grid, is
skipped with a printed reason; one that fails is recorded with its error; neither crashes the run."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _lm_peers  # noqa: E402

GRIDS = {"g64": ("symmetric INT4, group 64", 4, 64)}


def bench(tmp_path: Path) -> _lm_peers.LMBench:
    return _lm_peers.LMBench(
        model=nn.Linear(4, 4),
        fp32_path=tmp_path / "absent.onnx",
        test=torch.zeros(1, 8, dtype=torch.int64),
        calib=torch.zeros(1, 8, dtype=torch.int64),
        folder=tmp_path,
        layers=1,
        kv_heads=1,
        head_dim=4,
        reference=math.nan,
        fp32_size_bytes=1,
    )


@pytest.mark.parametrize(
    ("peer", "package"),
    [("nncf-awq-se", "nncf"), ("torchao-rtn", "torchao"), ("ort-hqq", "onnxruntime")],
)
def test_missing_package_is_skipped_with_its_name(
    peer: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    seen: list[dict] = []
    rows = _lm_peers.run_peers(bench(tmp_path), [peer], GRIDS, seen.append)
    assert rows == seen and len(rows) == 1
    assert rows[0]["name"] == f"{peer}-g64"
    assert package in rows[0]["skipped"] and "perplexity_deployed" not in rows[0]
    assert f"skipped peer {peer}" in capsys.readouterr().err


def test_grid_a_peer_cannot_express_is_skipped(tmp_path: Path, capsys) -> None:
    grids = {"int3g64": ("symmetric INT3, group 64", 3, 64), "pc": ("per channel", 4, None)}
    rows = _lm_peers.run_peers(bench(tmp_path), ["ort-rtn"], grids)
    assert [r["name"] for r in rows] == ["ort-rtn-int3g64", "ort-rtn-pc"]
    assert "not 3" in rows[0]["skipped"] and "per-channel" in rows[1]["skipped"]
    assert capsys.readouterr().err.count("skipped peer ort-rtn") == 2


def test_failing_peer_is_recorded_not_raised(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    (row,) = _lm_peers.run_peers(bench(tmp_path), ["ort-rtn"], GRIDS)  # no FP32 file
    assert "absent.onnx" in row["error"] and "skipped" not in row


def test_unknown_peer_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ort-hqq"):
        _lm_peers.run_peers(bench(tmp_path), ["gptq-peer"], GRIDS)


def test_peers_on_a_tiny_llama_give_rows_of_the_benchmark_shape(tmp_path: Path) -> None:
    """Each installed peer quantizes a tiny random Llama's ONNX export (or the model itself,
    torchao) at group 64 and is measured on the same windows; an absent one is skipped."""
    from toys import tiny_llama  # tests/toys.py

    from edgequant.export.lm import export_lm_onnx

    model = tiny_llama(layers=1)
    fp32 = tmp_path / "fp32.onnx"
    export_lm_onnx(model, fp32, quantized=False)
    cfg: Any = model.config
    g = torch.Generator().manual_seed(0)
    b = _lm_peers.LMBench(
        model=model,
        fp32_path=fp32,
        test=torch.randint(0, cfg.vocab_size, (2, 32), generator=g),
        calib=torch.randint(0, cfg.vocab_size, (2, 32), generator=g),
        folder=tmp_path,
        layers=cfg.num_hidden_layers,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        reference=math.nan,
        fp32_size_bytes=fp32.stat().st_size,
    )
    b.reference = _lm_peers.ort_perplexity(b, fp32)
    assert math.isclose(b.reference, _lm_peers.torch_perplexity(model, b.test), rel_tol=1e-4)
    rows = _lm_peers.run_peers(b, list(_lm_peers.PEERS), GRIDS)
    assert [r["name"] for r in rows] == [f"{n}-g64" for n in _lm_peers.PEERS]
    for row in rows:
        assert "error" not in row, row
        if "skipped" in row:
            assert "is not installed" in row["skipped"]
            continue
        assert 0.8 < row["ratio_to_reference"] < 1.5, row
        assert row["perplexity_deployed"] == pytest.approx(b.reference * row["ratio_to_reference"])
        if row["runtime"].startswith("ONNX Runtime"):
            # Four weight MatMuls a block: q/k/v merged, o, gate/up merged, down.
            assert row["kernels"].get("MatMulNBits", 0) >= 4 * cfg.num_hidden_layers, row
    if not any("skipped" in r for r in rows if r["name"].startswith("nncf")):
        # Per channel NNCF needs opset 21 (INT4 DequantizeLinear); the peer converts the graph.
        (row,) = _lm_peers.run_peers(b, ["nncf-awq-se"], {"pc": ("per channel", 4, None)})
        assert "error" not in row, row
        assert 0.8 < row["ratio_to_reference"] < 1.5, row
        assert row["kernels"].get("DequantizeLinear", 0) >= 4 * cfg.num_hidden_layers, row
