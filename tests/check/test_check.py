"""eq.check and `edgequant check`: the ops a target cannot run in integer, before calibration; bad
arguments refused with their names."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import AdaptivePools, by_op, randn_rows, relu_mlp  # tests/toys.py
from zoo import Attention  # tests/zoo.py: nn.MultiheadAttention called as `a, _ = attn(h, h, h)`

import edgequant as eq
from edgequant.check import KEEP_FLOAT, REFUSE, REMOVE, REPLACE
from edgequant.cli import main
from edgequant.examples.cifar10 import resnet20
from edgequant.export.check_onnx import check_onnx
from edgequant.export.onnx import export_float_onnx
from edgequant.targets import TARGETS


class Block(nn.Module):
    """A transformer-ish block: LayerNorm, GELU, a gated product, softmax at the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.fc1(x)))
        h = h * torch.sigmoid(h)
        return F.softmax(self.fc2(h), dim=-1)


def test_resnet20_is_fully_integer_as_it_is() -> None:
    result = eq.check(resnet20(), "mcu-int8", torch.randn(2, 3, 32, 32))
    assert result.ok and result.rows == [] and result.fully_integer
    assert result.traced_with == "torch.fx"
    assert result.integer_ops["conv"] == 19 and result.integer_ops["add"] == 9
    assert result.integer_ops["avgpool"] == 1 and result.integer_ops["pad"] == 2
    assert "OK" in str(result)


def test_mcu_lists_every_op_with_its_choice() -> None:
    result = eq.check(Block(), "mcu-int8", torch.randn(2, 8))
    assert not result.ok
    assert by_op(result) == {
        "layer_norm": REFUSE,
        "gelu": REPLACE,
        "sigmoid": REFUSE,  # inside the model: no integer form in the export
        "mul": REFUSE,
        "softmax": REMOVE,  # at the output: argmax unchanged without it
    }
    gelu = next(r for r in result.rows if r.op == "gelu")
    assert gelu.node == "act" and "nn.ReLU" in gelu.choice and "lookup table" in gelu.choice
    text = str(result)
    assert "NOT OK" in text and "norm" in text and "layer_norm" in text


def test_targets_that_allow_float_keep_those_ops_in_float() -> None:
    for target in ("onnxruntime", "tflite-int8", "tensorrt", "dsp-pow2"):
        result = eq.check(Block(), target)  # fx needs no example inputs
        assert result.ok, target
        assert {r.action for r in result.rows} == {KEEP_FLOAT}
        assert len(result.rows) == 5


def test_standalone_batchnorm_cannot_be_folded() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    result = eq.check(model, "mcu-int8", torch.randn(3, 4))
    assert by_op(result) == {"batch_norm": REFUSE}
    folded = eq.check(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "mcu-int8")
    assert folded.ok and folded.rows == []


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown target 'gpu'") as err:
        eq.check(Block(), "gpu")
    assert all(name in str(err.value) for name in TARGETS)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        eq.check("model", "mcu-int8")  # type: ignore[arg-type]


def test_check_leaves_training_flags_alone() -> None:
    model = Block().train()
    eq.check(model, "mcu-int8", torch.randn(2, 8))
    assert all(m.training for m in model.modules())


def test_to_dict_has_rows_and_ok() -> None:
    d = eq.check(Block(), "mcu-int8").to_dict()
    assert d["ok"] is False and d["target"] == "mcu-int8"
    assert {"node", "op", "action", "choice"} <= set(d["rows"][0])


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check") / "block.onnx"
    export_float_onnx(Block().eval(), path, torch.randn(2, 8))
    return path


def test_check_onnx_reads_the_graph(block_onnx: Path) -> None:
    result = check_onnx(block_onnx, "mcu-int8")
    ops = by_op(result)
    assert not result.ok and result.traced_with == "ONNX graph"
    assert ops.get("softmax") == REMOVE
    assert "layer_norm" in ops and "sigmoid" in ops
    assert result.integer_ops.get("linear") == 2
    assert check_onnx(block_onnx, "onnxruntime").ok


def test_cli_check_onnx(block_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--target", "mcu-int8", str(block_onnx)]) == 1
    out = capsys.readouterr().out
    assert "NOT OK" in out and "softmax" in out
    assert main(["check", "--target", "onnxruntime", "--json", str(block_onnx)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_cli_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "check_task.py").write_text(
        textwrap.dedent(
            """\
            import torch
            from torch import nn

            def model():
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(144, 2))

            def calib():
                return [torch.randn(2, 3, 8, 8)]
            """
        )
    )
    config = tmp_path / "c.yaml"
    config.write_text("model: check_task:model\ncalib_data: check_task:calib\ntarget: mcu-int8\n")
    code = main(["check", "--config", str(config)])
    out = capsys.readouterr().out
    # The config's target; SiLU has an integer stand-in (ReLU), so the model must change.
    assert code == 1 and "silu" in out and "replace with nn.ReLU" in out and "mcu-int8" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--target", "mcu-int8", "x.onnx"], "no such ONNX file"),
        (["check", "x.onnx"], "--target is needed"),
        (["check", "--target", "mcu-int8"], "give either MODEL.onnx or --config"),
    ],
)
def test_cli_check_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_check_unknown_target(block_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--target", "gpu", str(block_onnx)]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'gpu'" in err and "mcu-int8" in err


def test_inputs_that_do_not_fit_give_a_note_and_no_traceback(capsys) -> None:
    # Before: torch's ShapeProp printed the failing op's traceback to stderr before the result.
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    result = eq.check(model, "onnxruntime", torch.randn(2, 9))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err == ""
    assert any(
        "the model failed on example_inputs (RuntimeError: mat1 and mat2 shapes" in n
        for n in result.notes
    )


def test_attention_module_returning_a_tuple_is_listed() -> None:
    x = torch.randn(2, 5, 8)
    rows = eq.check(Attention().eval(), "mcu-int8", x).rows
    assert [(r.node, r.op, r.action) for r in rows] == [("attn", "attention", REFUSE)]
    rows = eq.check(Attention().eval(), "onnxruntime", x).rows
    assert [(r.node, r.action) for r in rows] == [("attn", KEEP_FLOAT)]


def test_fully_integer_target_refuses_before_calibration() -> None:
    """eq.quantize for mcu-int8 stops at the first batch with the op and the layer named."""
    read = []

    def calib(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            read.append(i)
            yield torch.randn(4, 8)

    recipe = eq.Recipe.preset("w8a8").for_target("mcu-int8")
    with pytest.raises(ValueError, match=r"op 'gelu' at 'act'.*op 'sigmoid'"):
        eq.quantize(Block().eval(), recipe, calib(3))
    assert read == [0]
    with pytest.raises(ValueError, match=r"method 'dynamic' .* layer 'fc1' \(Linear\)"):
        eq.quantize(Block().eval(), recipe, calib(3), method="dynamic")
    with pytest.raises(ValueError, match=r"method 'weight_only' keeps activations in float"):
        eq.quantize(Block().eval(), recipe, calib(3), method="weight_only")
    assert read == [0]


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


def test_check_with_example_inputs_of_the_wrong_shape_names_them() -> None:
    with pytest.raises(ValueError, match=r"failed on example_inputs \(a Tensor \(2, 7\) float32\)"):
        eq.check(_Untraceable(), "mcu-int8", randn_rows(2, 7))
    result = eq.check(relu_mlp(8, 12, 12, 4), "mcu-int8", randn_rows(2, 7))
    assert any("mat1 and mat2 shapes cannot be multiplied" in n for n in result.notes)


@pytest.mark.parametrize("target", ["mcu-int8", "tflite-int8", "executorch"])
def test_uneven_adaptive_max_pool_is_refused_before_calibration(target: str) -> None:
    """eq.quantize for the targets whose files have no adaptive max pool refuses one with
    windows of different sizes at the first batch (its shapes), naming the op and the layer;
    the same model on inputs whose size the output size divides is quantized."""
    read = []

    def calib(steps: int, n: int = 3):  # type: ignore[no-untyped-def]
        for i in range(n):
            read.append(i)
            yield torch.randn(4, 2, steps)

    recipe = eq.Recipe.preset("w8a8").for_target(target)
    model = AdaptivePools(functional=False).eval()
    with pytest.raises(
        ValueError, match=r"op 'adaptive_max_pool1d \(uneven windows\)' at 'pool' \(refuse: "
    ) as err:
        eq.quantize(model, recipe, calib(10))
    assert read == [0] and "Nothing was calibrated" in str(err.value)
    qmodel = eq.quantize(model, recipe, calib(12))
    assert qmodel(torch.randn(1, 2, 12)).shape == (1, 2)
    onnx = eq.Recipe.preset("w8a8").for_target("onnxruntime")
    assert eq.quantize(model, onnx, calib(10)) is not None
