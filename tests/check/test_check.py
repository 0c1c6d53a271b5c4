"""eq.check and `edgequant check`: the ops a target cannot run in integer, before calibration; bad
arguments refused with their names.
Also covers check/ops.py, check/result.py, check/trace.py and export/check_onnx.py."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import relu_mlp  # tests/toys.py
from zoo import Attention  # tests/zoo.py: nn.MultiheadAttention called as `a, _ = attn(h, h, h)`

import edgequant as eq
from edgequant.check import KEEP_FLOAT, REFUSE, REMOVE, REPLACE, CheckResult
from edgequant.cli import main
from edgequant.examples.cifar10 import resnet20
from edgequant.export.check_onnx import check_onnx
from edgequant.export.onnx import export_float_onnx
from edgequant.recipe import Recipe
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


def _by_op(result: CheckResult) -> dict[str, str]:
    return {r.op: r.action for r in result.rows}


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
    assert _by_op(result) == {
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
    assert _by_op(result) == {"batch_norm": REFUSE}
    folded = eq.check(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "mcu-int8")
    assert folded.ok and folded.rows == []


class NewGELUActivation(nn.Module):
    """A library's own GELU class (as in transformers): known by its name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x**3)))


class Hooked(nn.Module):
    """Untraceable (data-dependent branch), with library activation classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():  # y = x: the branch taken is the input's sign
            self.fc.weight.copy_(torch.eye(4))
            self.fc.bias.zero_()
        self.act = NewGELUActivation()
        self.gate = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.act(y) if y.sum() > 0 else self.gate(y)


def test_library_activation_classes_are_known_by_name() -> None:
    result = eq.check(Hooked(), "mcu-int8", torch.ones(2, 4))
    assert result.traced_with == "forward hooks"
    assert _by_op(result) == {"gelu": REPLACE}  # only the branch that ran
    result = eq.check(Hooked(), "mcu-int8", -torch.ones(2, 4))
    assert _by_op(result) == {"hardswish": REPLACE}


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.act(self.fc(x))
        return self.act(self.fc(-x))


def test_untraceable_model_falls_back_to_hooks() -> None:
    result = eq.check(Dynamic(), "mcu-int8", torch.ones(2, 4))
    assert result.traced_with == "forward hooks"
    assert _by_op(result) == {"tanh": REPLACE}
    assert any("functional ops" in n for n in result.notes)
    with pytest.raises(ValueError, match="pass example_inputs"):
        eq.check(Dynamic(), "mcu-int8")


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
    ops = _by_op(result)
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


def test_check_onnx_shape_reads_and_resize_modes(tmp_path: Path) -> None:
    """Shape/Size of a float tensor is no float op; nearest Resize is integer, linear is not."""
    import onnx
    from onnx import TensorProto, helper

    def graph_with(mode: str) -> Path:
        nodes = [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
            [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])],
        )
        path = tmp_path / f"{mode}.onnx"
        onnx.save(helper.make_model(graph), str(path))
        return path

    nearest = check_onnx(graph_with("nearest"), "mcu-int8")
    assert nearest.rows == [] and nearest.integer_ops == {"upsample (nearest)": 1}
    linear = check_onnx(graph_with("linear"), "mcu-int8")
    assert [(r.op, r.action) for r in linear.rows] == [("Resize", REFUSE)]


def _x(rows: int = 16, features: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


def test_check_with_a_recipe_as_target_says_a_name_is_needed() -> None:
    with pytest.raises(TypeError, match=r"target must be a target name.*'onnxruntime'.*got Recipe"):
        eq.check(relu_mlp(8, 12, 12, 4), Recipe.preset("w8a8"))  # type: ignore[arg-type]


def test_check_with_example_inputs_of_the_wrong_shape_names_them() -> None:
    with pytest.raises(ValueError, match=r"failed on example_inputs \(a Tensor \(2, 7\) float32\)"):
        eq.check(_Untraceable(), "mcu-int8", _x(2, 7))
    result = eq.check(relu_mlp(8, 12, 12, 4), "mcu-int8", _x(2, 7))
    assert any("mat1 and mat2 shapes cannot be multiplied" in n for n in result.notes)


@pytest.mark.parametrize("style", ["ZerosLikeShortcut", "ZerosShortcut", "NewZerosShortcut"])
def test_tensors_of_zeros_made_from_a_shape_are_not_computation(style: str) -> None:
    """zeros_like, torch.zeros(x.shape...) and new_zeros are counted as constants (fx traces
    all three: no fallback to hooks), and mcu-int8 takes the model."""
    import zoo

    model = getattr(zoo, style)().eval()
    result = eq.check(model, "mcu-int8", torch.randn(2, 3, 8, 8))
    assert result.traced_with == "torch.fx"
    assert result.ok and result.rows == []
    assert result.integer_ops["zeros (a constant: its zero point)"] == 1
    assert result.integer_ops["concat"] == 1


def test_other_tensor_factories_are_traced_and_refused_by_name() -> None:
    """torch.ones of a traced shape is followed by fx (before, the whole model fell back to
    hooks and the op went unseen) and, having no integer meaning here, refused by name."""

    class OnesShortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + torch.ones(x.shape[0], 3, x.shape[2], x.shape[3])

    result = eq.check(OnesShortcut(), "mcu-int8", torch.randn(2, 3, 4, 4))
    assert result.traced_with == "torch.fx"
    assert _by_op(result) == {"ones": REFUSE}


def test_check_onnx_takes_zeros_made_from_a_shape(tmp_path: Path) -> None:
    """ConstantOfShape of 0 and Expand of a constant 0 (how exporters write zeros_like and
    new_zeros) are constants; of another value they are refused by name."""
    import onnx
    from onnx import TensorProto, helper

    def graph_with(value: float) -> Path:
        fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [value])
        nodes = [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("ConstantOfShape", ["s"], ["z"], value=fill),
            helper.make_node("Expand", ["zero", "s"], ["e"]),
            helper.make_node("Concat", ["x", "z", "e"], ["y"], axis=1),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 2, 2])],
            [helper.make_tensor("zero", TensorProto.FLOAT, [], [value])],
        )
        path = tmp_path / f"{value}.onnx"
        onnx.save(helper.make_model(graph), str(path))
        return path

    zeros = check_onnx(graph_with(0.0), "mcu-int8")
    assert zeros.rows == [] and zeros.integer_ops == {
        "zeros (a constant: its zero point)": 2,
        "concat": 1,
    }
    ones = check_onnx(graph_with(1.0), "mcu-int8")
    assert sorted((r.op, r.action) for r in ones.rows) == [
        ("ConstantOfShape", REFUSE),
        ("Expand", REFUSE),
    ]
