"""export/check_onnx.py: the same check as eq.check, read from an ONNX graph."""

from __future__ import annotations

from pathlib import Path

from edgequant.check import REFUSE
from edgequant.export.check_onnx import check_onnx


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
