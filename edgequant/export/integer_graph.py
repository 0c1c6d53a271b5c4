"""The fully integer graph property of an ONNX QDQ model, and the exact rewrites that give an
exported graph that property (what the `mcu-int8` target asks for): merged slices, inputs
quantized before the ops that only move them, activations folded into their quantizers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from edgequant.export.names import fresh_name

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
# Float constants a node may read besides dequantized tensors: the pad value and clip bounds
# are parameters of an integer kernel (the zero point, the clamp), not data.
_PARAMETER_INPUTS = {"Pad": {2}, "Clip": {1, 2}, "Resize": {1, 2}}  # Resize: roi, scales
# Ops that read only their input's shape, never its values: shape arithmetic, not computation
# (the exporter reads a dynamic batch size with Shape of the graph's float input).
SHAPE_ONLY_OPS = ("Shape", "Size")


class IntegerGraphError(ValueError):
    """The graph is not one the integer runner executes (names the node and its op type)."""


def dtype_range(dtype: Any) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def load_model(model: Any) -> Any:
    import onnx

    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"no such ONNX file: {os.fspath(model)}")
        # export/inspect.py imports onnx: loaded here, so that importing edgequant does not.
        from edgequant.export.inspect import load_onnx_model

        # A ValueError naming the file for a text file, an empty file or another protobuf.
        return load_onnx_model(model)
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(
            f"expected an ONNX file path or onnx.ModelProto, got {type(model).__name__}"
        )
    return model


def readers_of(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


def constant_arrays(graph: Any) -> dict[str, np.ndarray]:
    """Value name -> array of every initializer and Constant node of an ONNX graph."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def float_tensors(model: Any) -> set[str]:
    import onnx
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    inferred = onnx.shape_inference.infer_shapes(model)
    names = set()
    for v in (
        list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    ):
        if v.type.tensor_type.elem_type in floats:
            names.add(v.name)
    for t in model.graph.initializer:
        if t.data_type in floats:
            names.add(t.name)
    return names


def fully_integer_violations(model: Any) -> list[str]:
    """Every way the graph breaks "each compute node reads from a DequantizeLinear and feeds a
    QuantizeLinear" ([] when it is fully integer).

    Compute node: any node but QuantizeLinear, DequantizeLinear and Constant that reads or
    writes a float tensor (shape arithmetic on int64 is not computation on data, and Shape and
    Size read no values, so a float input of theirs is no float edge). Float constants are
    allowed only as Pad's pad value (0) and Clip's bounds.
    """
    model = load_model(model)
    graph = model.graph
    floats = float_tensors(model)
    consts = constant_arrays(graph)
    producer = {o: n for n in graph.node for o in n.output}
    readers = readers_of(graph)
    outputs = {o.name for o in graph.output}
    problems = []
    for node in graph.node:
        if node.op_type in (_Q, _DQ, "Constant", *SHAPE_ONLY_OPS):
            continue
        label = f"node {node.name or node.output[0]!r} ({node.op_type})"
        float_in = [(k, i) for k, i in enumerate(node.input) if i and i in floats]
        float_out = [o for o in node.output if o in floats]
        if not float_in and not float_out:
            continue
        for k, name in float_in:
            src = producer.get(name)
            if src is not None and src.op_type == _DQ:
                continue
            if name in consts and k in _PARAMETER_INPUTS.get(node.op_type, ()):
                if node.op_type == "Pad" and np.any(consts[name] != 0):
                    problems.append(f"{label} pads with the float value {consts[name]}, not 0")
                continue
            origin = (
                f"{src.op_type} {src.name or src.output[0]!r}"
                if src is not None
                else ("a float constant" if name in consts else "the graph input")
            )
            problems.append(f"{label} reads float tensor {name!r} from {origin}")
        for name in float_out:
            users = readers.get(name, [])
            if name in outputs:
                problems.append(f"{label} writes the graph output {name!r} in float")
            bad = [u for u in users if u.op_type != _Q]
            if bad:
                what = ", ".join(f"{u.op_type} {u.name or u.output[0]!r}" for u in bad[:3])
                problems.append(f"{label} feeds {what} with float tensor {name!r}")
    return problems


def merge_slices(model: Any) -> int:
    """Merge a Slice whose only reader is another Slice (on other axes) into that one: the
    exporter writes x[:, :, ::2, ::2] as one Slice per axis, with a float tensor between them.
    Exact; returns how many were merged."""
    from onnx import numpy_helper

    graph = model.graph
    merged = 0
    while True:
        consts = constant_arrays(graph)
        readers = readers_of(graph)
        outputs = {o.name for o in graph.output}
        pair = None
        for first in graph.node:
            users = readers.get(first.output[0], []) if first.op_type == "Slice" else []
            if len(users) != 1 or users[0].op_type != "Slice" or first.output[0] in outputs:
                continue
            second = users[0]
            parts = []
            for node in (first, second):
                ins = list(node.input) + [""] * (5 - len(node.input))
                if not all(i in consts for i in ins[1:4]) or (ins[4] and ins[4] not in consts):
                    break
                starts = consts[ins[1]].astype(np.int64).reshape(-1)
                steps = (
                    consts[ins[4]].astype(np.int64).reshape(-1) if ins[4] else np.ones_like(starts)
                )
                parts.append(
                    (starts, consts[ins[2]].reshape(-1), consts[ins[3]].reshape(-1), steps)
                )
            else:
                axes = np.concatenate([p[2] for p in parts]).astype(np.int64)
                if len(set(axes.tolist())) == len(axes) and np.all(axes >= 0):
                    pair = (first, second, parts)
                    break
        if pair is None:
            return merged
        first, second, parts = pair
        names = []
        for k, label in enumerate(("starts", "ends", "axes", "steps")):
            name = f"{second.output[0]}_merged_{label}"
            value = np.concatenate([p[k] for p in parts]).astype(np.int64)
            graph.initializer.append(numpy_helper.from_array(value, name))
            names.append(name)
        del second.input[:]
        second.input.extend([first.input[0]] + names)
        graph.node.remove(first)
        merged += 1


# Ops that only move or regroup values (each output value is one of the input's values).
_VALUE_MOVES = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity")


def quantize_inputs_first(model: Any) -> int:
    """Where a float graph input reaches its QuantizeLinear only through ops that move values
    (a model that flattens or reshapes its input before the first layer), quantize the input
    first: QuantizeLinear/DequantizeLinear with that quantizer's per-tensor scale and zero point
    right after the input, the moves reading its output. Exact (quantization is elementwise, the
    moves keep values, and the QuantizeLinear after them re-quantizes to the same grid); the
    moves then run on integers. Returns how many inputs were rewritten.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    consts = constant_arrays(graph)
    readers = readers_of(graph)
    outputs = {o.name for o in graph.output}
    rewritten = 0
    for value in graph.input:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        moves, quantizers, frontier, ok = [], [], [value.name], True
        while frontier and ok:
            name = frontier.pop()
            ok = name not in outputs
            for reader in readers.get(name, []):
                if reader.op_type in SHAPE_ONLY_OPS:
                    continue
                if reader.op_type == _Q and reader.input[0] == name:
                    quantizers.append(reader)
                elif reader.op_type in _VALUE_MOVES and reader.input[0] == name:
                    moves.append(reader)
                    frontier.extend(reader.output)
                else:
                    ok = False
        if not ok or not moves or not quantizers:
            continue
        params = {tuple(q.input[1:3]) for q in quantizers}
        if len(params) != 1:
            continue
        scale, zero_point = next(iter(params))
        if scale not in consts or consts[scale].size != 1:
            continue
        q_out, dq_out = f"{value.name}_quantized", f"{value.name}_dequantized"
        first = [
            helper.make_node(_Q, [value.name, scale, zero_point], [q_out], name=f"{q_out}_q"),
            helper.make_node(_DQ, [q_out, scale, zero_point], [dq_out], name=f"{q_out}_dq"),
        ]
        for move in moves:
            if move.input[0] == value.name:
                move.input[0] = dq_out
        nodes = first + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        rewritten += 1
    return rewritten


def fold_activations_into_quantizers(model: Any) -> int:
    """Drop each Relu/Clip whose only reader is a QuantizeLinear whose grid the activation
    cannot change: Q(relu(x)) == Q(x) when the zero point is the grid's lowest level (every
    negative x saturates there anyway); Q(clip(x, a, b)) == Q(x) when a and b quantize to or
    beyond the grid's ends. Exact, so the simulation still verifies; returns how many."""
    graph = model.graph
    consts = constant_arrays(graph)
    readers = readers_of(graph)
    outputs = {o.name for o in graph.output}
    drop = []
    for node in graph.node:
        if node.op_type not in ("Relu", "Clip") or node.output[0] in outputs:
            continue
        users = readers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != _Q:
            continue
        q = users[0]
        if len(q.input) < 3 or q.input[1] not in consts or q.input[2] not in consts:
            continue
        scale = consts[q.input[1]].astype(np.float32)
        zp = consts[q.input[2]]
        if scale.size != 1:
            continue
        lo_level, hi_level = dtype_range(zp.dtype)
        zp_i = int(zp.reshape(()))
        lo: float | None = 0.0
        hi: float | None = None
        if node.op_type == "Clip":
            bounds = [consts.get(i) if i else None for i in list(node.input[1:3]) + ["", ""]][:2]
            if any(i and i not in consts for i in node.input[1:3]):
                continue
            lo = None if bounds[0] is None else float(bounds[0])
            hi = None if bounds[1] is None else float(bounds[1])

        s = scale.reshape(())
        if lo is not None and int(np.rint(np.float32(lo) / s)) + zp_i > lo_level:
            continue
        if hi is not None and int(np.rint(np.float32(hi) / s)) + zp_i < hi_level:
            continue
        drop.append(node)
    for node in drop:
        for user in readers[node.output[0]]:
            for k, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[k] = node.input[0]
        graph.node.remove(node)
    if drop:  # the Clip bounds nothing reads any more
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
            graph.node.remove(n)
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
    return len(drop)


# Integer ops whose input and output the exporter may leave on the far side of value moves:
# F.adaptive_avg_pool1d exports as Unsqueeze -> ReduceMean -> Squeeze, a 1-d pool of a 2-d
# kernel the same way.
_POOLS = ("ReduceMean", "GlobalAveragePool", "AveragePool", "MaxPool")


def quantize_around_pools(model: Any) -> int:
    """Where a pool (_POOLS) reads a DequantizeLinear, or feeds QuantizeLinear nodes of one
    grid, only through ops that move values, put a QuantizeLinear/DequantizeLinear pair of that
    grid after each move on the way in and before each move on the way out. Exact (the moves
    keep values, so every value is already on the pair's grid); the moves then run on
    integers, and the pool reads and writes quantized tensors. Returns how many pairs."""
    from onnx import helper

    graph = model.graph
    taken = {v for n in graph.node for v in (*n.input, *n.output)}
    taken |= {t.name for t in graph.initializer} | {n.name for n in graph.node}
    consts = constant_arrays(graph)
    readers = readers_of(graph)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    edges: list[tuple[str, str, str]] = []  # (value, scale, zero point): a pair goes on it

    def per_tensor(scale: str, zero_point: str) -> bool:
        return scale in consts and consts[scale].size == 1 and zero_point in consts

    for pool in [n for n in graph.node if n.op_type in _POOLS]:
        # In: pool <- move <- ... <- DequantizeLinear, each move read by the next alone.
        chain, value = [], pool.input[0]
        while (src := producer.get(value)) is not None and src.op_type in _VALUE_MOVES:
            if len(readers.get(value, [])) != 1 or value in outputs:
                break
            chain.append(value)
            value = src.input[0]
        else:
            src = producer.get(value)
            if chain and src is not None and src.op_type == _DQ and per_tensor(*src.input[1:3]):
                edges += [(v, src.input[1], src.input[2]) for v in chain]
        # Out: pool -> move -> ... -> QuantizeLinear(s) of one grid.
        chain, value = [], pool.output[0]
        while True:
            users = readers.get(value, [])
            if value in outputs or not users:
                break
            if all(u.op_type == _Q for u in users):
                grids = {tuple(u.input[1:3]) for u in users}
                if chain and len(grids) == 1 and per_tensor(*next(iter(grids))):
                    scale, zero_point = next(iter(grids))
                    edges += [(v, scale, zero_point) for v in chain]
                break
            if len(users) != 1 or users[0].op_type not in _VALUE_MOVES:
                break
            chain.append(value)
            value = users[0].output[0]
    nodes = list(graph.node)
    for value, scale, zero_point in edges:
        q_out, dq_out = (
            fresh_name(f"{value}_quantized", taken),
            fresh_name(f"{value}_dequantized", taken),
        )
        pair = [
            helper.make_node(
                _Q, [value, scale, zero_point], [q_out], name=fresh_name(q_out, taken)
            ),
            helper.make_node(
                _DQ, [q_out, scale, zero_point], [dq_out], name=fresh_name(dq_out, taken)
            ),
        ]
        reader = readers[value][0]
        reader.input[list(reader.input).index(value)] = dq_out
        at = nodes.index(reader)
        nodes[at:at] = pair
    if edges:
        del graph.node[:]
        graph.node.extend(nodes)
    return len(edges)
