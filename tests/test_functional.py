"""functional.py against its references: PyTorch's fused fake-quantize ops, an independent numpy
computation, and ONNX Runtime's QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant import functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SETTINGS = settings(max_examples=40, deadline=None)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit (so -0.0 != 0.0 and NaN payloads count)."""
    assert actual.dtype == expected.dtype == torch.float32
    assert actual.shape == expected.shape
    bad = actual.view(torch.int32) != expected.view(torch.int32)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {bad.numel()} differ, e.g. {actual[bad][:5]} vs {expected[bad][:5]}"
    )


# --- strategies ----------------------------------------------------------------------------------


@st.composite
def grids(draw: st.DrawFn) -> tuple[int, int]:
    """(qmin, qmax) for 2..16 bits, signed (also narrow) or unsigned."""
    bits = draw(st.integers(2, 16))
    signed = draw(st.booleans())
    if not signed:
        return 0, 2**bits - 1
    narrow = draw(st.booleans())
    return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1


@st.composite
def cases(draw: st.DrawFn, granularity: str) -> dict[str, object]:
    """A tensor, its grid and parameters. Values are drawn in units of steps, inside and outside
    the grid, a quarter of them on exact half steps (the ties that rounding must break)."""
    qmin, qmax = draw(grids())
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank))
    axis: int | None = None
    group_size: int | None = None
    if granularity != "tensor":
        axis = draw(st.integers(0, rank - 1))
        if granularity == "group":
            group_size = draw(st.sampled_from([1, 2, 4, 8]))
            shape[axis] = group_size * draw(st.integers(1, 4))
    pshape = F.param_shape(tuple(shape), axis, group_size)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # scales log-uniform over 2^-20 .. 2^10, not powers of two in general
    scale = torch.exp2(torch.rand(pshape, generator=g) * 30 - 20) * (
        1 + torch.rand(pshape, generator=g)
    )
    zero_point = torch.randint(qmin, qmax + 1, pshape, generator=g, dtype=torch.int32)
    steps = torch.rand(shape, generator=g, dtype=torch.float64) * (qmax - qmin) * 1.2 - 0.1 * (
        qmax - qmin
    )
    ties = torch.rand(shape, generator=g) < 0.25
    steps = torch.where(ties, torch.floor(steps) + 0.5, steps)
    s_full = F.broadcast_param(scale, torch.empty(shape), axis, group_size).double()
    z_full = F.broadcast_param(zero_point, torch.empty(shape), axis, group_size).double()
    x = ((steps + qmin - z_full) * s_full).float()
    return {
        "x": x,
        "scale": scale.float(),
        "zero_point": zero_point,
        "qmin": qmin,
        "qmax": qmax,
        "axis": axis,
        "group_size": group_size,
    }


def numpy_fake_quantize(c: dict) -> np.ndarray:
    """An independent float32 computation: round(x * (1/scale)) half to even, saturate, back."""
    x = c["x"].numpy()
    shape = x.shape
    scale = F.broadcast_param(c["scale"], c["x"], c["axis"], c["group_size"]).numpy()
    zp = F.broadcast_param(c["zero_point"], c["x"], c["axis"], c["group_size"]).numpy()
    scale, zp = np.broadcast_to(scale, shape), np.broadcast_to(zp, shape).astype(np.int64)
    inv = np.float32(1.0) / scale
    q = np.clip(np.rint(x * inv).astype(np.float64) + zp, c["qmin"], c["qmax"]).astype(np.int64)
    return ((q - zp).astype(np.float32) * scale).astype(np.float32)


# --- bit-exact with PyTorch ----------------------------------------------------------------------


@SETTINGS
@given(cases("tensor"))
def test_per_tensor_matches_pytorch_bit_for_bit(c: dict) -> None:
    x, s, z, qmin, qmax = c["x"], c["scale"], c["zero_point"], c["qmin"], c["qmax"]
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    assert_bitwise(F.fake_quantize(x, s, z, qmin, qmax), ref)
    q = F.quantize(x, s, z, qmin, qmax)
    assert q.dtype == torch.int32 and int(q.min()) >= qmin and int(q.max()) <= qmax
    assert_bitwise(F.dequantize(q, s, z), ref)
    assert_bitwise(torch.from_numpy(numpy_fake_quantize(c)), ref)


@SETTINGS
@given(cases("channel"))
def test_per_channel_matches_pytorch_bit_for_bit(c: dict) -> None:
    x, s, z, qmin, qmax, axis = c["x"], c["scale"], c["zero_point"], c["qmin"], c["qmax"], c["axis"]
    ref = torch.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax)
    assert_bitwise(F.fake_quantize(x, s, z, qmin, qmax, axis), ref)
    q = F.quantize(x, s, z, qmin, qmax, axis)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert_bitwise(F.dequantize(q, s, z, axis), ref)
    assert_bitwise(torch.from_numpy(numpy_fake_quantize(c)), ref)


def per_group_reference(c: dict, x: torch.Tensor | None = None) -> torch.Tensor:
    """Per group as per channel on a reshaped tensor: move the grouped axis last, split it into
    (groups, group_size), and give every (other dims..., group) its own channel. Scales laid out
    as param_shape flatten to the same channel order after moving the axis last."""
    x = c["x"] if x is None else x
    axis, g = c["axis"], c["group_size"]
    moved = x.movedim(axis, -1)
    rows = moved.reshape(*moved.shape[:-1], moved.shape[-1] // g, g).reshape(-1, g)
    scale = c["scale"].movedim(axis, -1).reshape(-1)
    zero_point = c["zero_point"].movedim(axis, -1).reshape(-1)
    out = torch.fake_quantize_per_channel_affine(rows, scale, zero_point, 0, c["qmin"], c["qmax"])
    return out.reshape(moved.shape).movedim(-1, axis)


@SETTINGS
@given(cases("group"))
def test_per_group_matches_per_channel_on_a_reshaped_tensor(c: dict) -> None:
    x, s, z, qmin, qmax = c["x"], c["scale"], c["zero_point"], c["qmin"], c["qmax"]
    axis, g = c["axis"], c["group_size"]
    ref = per_group_reference(c)
    assert_bitwise(F.fake_quantize(x, s, z, qmin, qmax, axis, g), ref)
    q = F.quantize(x, s, z, qmin, qmax, axis, g)
    assert_bitwise(F.dequantize(q, s, z, axis, g), ref)
    assert_bitwise(torch.from_numpy(numpy_fake_quantize(c)), ref)


def test_per_group_by_hand() -> None:
    x = torch.tensor([[0.4, 1.0, 3.0, 9.0], [-0.2, 0.6, 2.0, -6.0]])
    scale = torch.tensor([[0.5, 2.0], [0.4, 4.0]])  # (rows, groups of 2 along axis 1)
    zero_point = torch.zeros(2, 2, dtype=torch.int32)
    q = F.quantize(x, scale, zero_point, -8, 7, axis=1, group_size=2)
    # 0.4/0.5=0.8->1, 1.0/0.5=2, 3/2=1.5->2 (even), 9/2=4.5->4 (even)
    # -0.2/0.4=-0.5->-0 (even), 0.6/0.4=1.5->2, 2/4=0.5->0, -6/4=-1.5->-2
    assert torch.equal(q, torch.tensor([[1, 2, 2, 4], [0, 2, 0, -2]], dtype=torch.int32))
    lo, hi = F.reduce_min_max(x, axis=1, group_size=2)
    assert torch.equal(lo, torch.tensor([[0.4, 3.0], [-0.2, -6.0]]))
    assert torch.equal(hi, torch.tensor([[1.0, 9.0], [0.6, 2.0]]))


# --- rounding and saturation ---------------------------------------------------------------------


def test_round_half_to_even() -> None:
    steps = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5])
    expected = torch.tensor([0, 2, 2, 4, 0, -2, -2, -4], dtype=torch.int32)
    for scale in (1.0, 0.25, 8.0):  # powers of two: x / scale is exact, the tie is real
        s, z = torch.tensor(scale), torch.tensor(0, dtype=torch.int32)
        x = steps * scale
        assert torch.equal(F.quantize(x, s, z, -128, 127), expected)
        assert torch.equal(F.fake_quantize(x, s, z, -128, 127), expected.float() * scale)
    # with a zero point the tie is broken before it is added: 2.5 -> 2, + 3 = 5
    q = F.quantize(
        torch.tensor([2.5]), torch.tensor(1.0), torch.tensor(3, dtype=torch.int32), 0, 255
    )
    assert int(q) == 5


def test_saturation_even_where_the_float_overflows() -> None:
    s, z = torch.tensor(F.SCALE_EPS), torch.tensor(3, dtype=torch.int32)
    x = torch.tensor([1e13, -1e13, 3e38, -3e38, 1e20])
    assert torch.equal(
        F.quantize(x, s, z, 0, 255), torch.tensor([255, 0, 255, 0, 255], dtype=torch.int32)
    )
    assert_bitwise(
        F.dequantize(F.quantize(x, s, z, 0, 255), s, z),
        torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255),
    )


# --- parameters from a range ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 3.0, -2.0, 1e-30])
@pytest.mark.parametrize(
    ("qmin", "qmax", "symmetric"),
    [(-128, 127, True), (0, 255, False), (0, 255, True), (-8, 7, False)],
)
@pytest.mark.parametrize("pow2", [False, True])
def test_constant_and_zero_tensors_get_a_valid_scale(
    value: float, qmin: int, qmax: int, symmetric: bool, pow2: bool
) -> None:
    x = torch.full((4, 5), value)
    scale, zero_point = F.calc_qparams(*F.reduce_min_max(x), qmin, qmax, symmetric, pow2)
    assert bool(torch.isfinite(scale)) and float(scale) > 0
    assert qmin <= int(zero_point) <= qmax
    fq = F.fake_quantize(x, scale, zero_point, qmin, qmax)
    # within half a step (a symmetric unsigned grid maps max|x| onto qmax + 1/2, as PyTorch does)
    assert bool(((fq - x).abs() <= float(scale) / 2 * (1 + 1e-5)).all())
    if value == 0.0:
        assert bool((fq == 0).all())  # zero is exactly representable
    # per channel, one channel all zero
    xc = torch.stack([torch.zeros(5), torch.linspace(-1, 2, 5)])
    sc, zc = F.calc_qparams(*F.reduce_min_max(xc, axis=0), qmin, qmax, symmetric, pow2)
    assert bool(torch.isfinite(sc).all()) and bool((sc > 0).all())


@SETTINGS
@given(
    lo=st.floats(-1e6, 0.0),
    hi=st.floats(0.0, 1e6),
    grid=grids(),
    symmetric=st.booleans(),
)
def test_pow2_scales_are_powers_of_two_and_never_smaller(
    lo: float, hi: float, grid: tuple[int, int], symmetric: bool
) -> None:
    qmin, qmax = grid
    lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
    scale, _ = F.calc_qparams(lo_t, hi_t, qmin, qmax, symmetric)
    scale2, zero_point2 = F.calc_qparams(lo_t, hi_t, qmin, qmax, symmetric, pow2=True)
    mantissa, _ = math.frexp(float(scale2))
    assert mantissa == 0.5  # exactly 2^k
    assert float(scale2) >= float(scale)
    assert float(scale2) < 2 * float(scale) * (1 + 1e-6)
    assert qmin <= int(zero_point2) <= qmax


@SETTINGS
@given(lo=st.floats(-1e4, 1e4), width=st.floats(0.0, 1e4), grid=grids(), symmetric=st.booleans())
def test_range_maps_onto_the_grid(
    lo: float, width: float, grid: tuple[int, int], symmetric: bool
) -> None:
    """The range (widened to hold 0) fits in the grid up to half a step and 0 is exact."""
    qmin, qmax = grid
    lo_t, hi_t = torch.tensor(lo), torch.tensor(lo + width)
    scale, zero_point = F.calc_qparams(lo_t, hi_t, qmin, qmax, symmetric)
    ends = torch.stack([torch.clamp(lo_t, max=0.0), torch.clamp(hi_t, min=0.0), torch.tensor(0.0)])
    fq = F.fake_quantize(ends, scale, zero_point, qmin, qmax)
    assert float(fq[2]) == 0.0
    assert bool(((fq - ends).abs() <= float(scale) * 0.5 * (1 + 1e-5) + ends.abs() * 2**-20).all())


# --- properties ----------------------------------------------------------------------------------


def steps_unclamped(c: dict) -> torch.Tensor:
    """round(x / scale) + zero point before saturation, as the fused op computes it."""
    s = F.broadcast_param(c["scale"], c["x"], c["axis"], c["group_size"])
    z = F.broadcast_param(c["zero_point"], c["x"], c["axis"], c["group_size"])
    return torch.round(c["x"] * torch.reciprocal(s)).double() + z.double()


@SETTINGS
@given(st.sampled_from(["tensor", "channel", "group"]).flatmap(cases))
def test_error_bound_idempotence_and_straight_through_gradient(c: dict) -> None:
    x, s, z, qmin, qmax = c["x"], c["scale"], c["zero_point"], c["qmin"], c["qmax"]
    axis, g = c["axis"], c["group_size"]
    s_full = F.broadcast_param(s, x, axis, g)
    z_full = F.broadcast_param(z, x, axis, g).float()
    x = x.clone().requires_grad_(True)
    fq = F.fake_quantize(x, s, z, qmin, qmax, axis, g)
    # |fq(x) - x| <= scale / 2 inside the grid's range (plus float rounding of x / scale)
    inside_range = (x >= (qmin - z_full) * s_full) & (x <= (qmax - z_full) * s_full)
    err = (fq - x).abs()
    bound = s_full * 0.5 * (1 + 2**-20) + x.abs() * 2**-21
    assert bool((err <= bound)[inside_range].all())
    # idempotent
    again = F.fake_quantize(fq.detach(), s, z, qmin, qmax, axis, g)
    assert_bitwise(again, fq.detach())
    # gradient: 1 where round(x/scale)+zp lands on the grid, 0 where it was clipped
    fq.backward(torch.ones_like(fq))
    assert x.grad is not None
    q = steps_unclamped({**c, "x": x.detach()})
    on_grid = (q >= qmin) & (q <= qmax)
    assert torch.equal(x.grad, on_grid.float())


# --- ONNX Runtime --------------------------------------------------------------------------------

INT8 = (onnx.TensorProto.INT8, -128, 127, np.int8)
UINT8 = (onnx.TensorProto.UINT8, 0, 255, np.uint8)


def ort_session(nodes: list, inputs: list, outputs: list) -> object:
    from onnx import helper

    graph = helper.make_graph(nodes, "t", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def quantize_linear(
    qtype: int, rank: int, param_rank: int, axis: int | None, block: int | None = None
) -> object:
    """A session x, scale, zero point -> QuantizeLinear (opset 21); parameters are inputs."""
    from onnx import TensorProto, helper

    dims = [f"d{i}" for i in range(rank)]
    pdims = [f"p{i}" for i in range(param_rank)]
    attrs: dict[str, int] = {}
    if axis is not None:
        attrs["axis"] = axis
    if block is not None:
        attrs["block_size"] = block
    return ort_session(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, pdims),
            helper.make_tensor_value_info("z", qtype, pdims),
        ],
        [helper.make_tensor_value_info("y", qtype, dims)],
    )


def normal_data(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))


@pytest.mark.parametrize("qkind", [INT8, UINT8], ids=["int8", "uint8"])
@pytest.mark.parametrize("granularity", ["tensor", "axis1", "group"])
def test_quantize_agrees_with_onnxruntime_quantize_linear(qkind: tuple, granularity: str) -> None:
    """ONNX Runtime divides by the scale; we multiply by its float32 reciprocal, as PyTorch's
    fake-quantize does. Off a tie both round alike; near one they may differ by one step."""
    qtype, qmin, qmax, np_type = qkind
    x = normal_data((16, 64, 8, 8), seed=qmin + 1000)
    axis, group_size = {"tensor": (None, None), "axis1": (1, None), "group": (1, 16)}[granularity]
    pshape = F.param_shape(x.shape, axis, group_size)
    g = torch.Generator().manual_seed(3)
    total = differ = 0
    sess = quantize_linear(qtype, x.dim(), len(pshape), axis, group_size)
    for _ in range(8):
        scale = torch.exp2(torch.rand(pshape, generator=g) * 8 - 9) * (
            1 + torch.rand(pshape, generator=g)
        )
        zero_point = torch.randint(qmin // 2, qmax // 2 + 1, pshape, generator=g, dtype=torch.int32)
        ours = F.quantize(x, scale, zero_point, qmin, qmax, axis, group_size).numpy()
        feeds = {"x": x.numpy(), "s": scale.numpy(), "z": zero_point.numpy().astype(np_type)}
        ref = sess.run(None, feeds)[0].astype(np.int32)  # type: ignore[attr-defined]
        gap = np.abs(ours - ref)
        assert gap.max() <= 1
        total += gap.size
        differ += int((gap != 0).sum())
    assert differ <= total * 1e-3, f"{differ} of {total} differ"


@pytest.mark.parametrize("qkind", [INT8, UINT8], ids=["int8", "uint8"])
def test_quantize_near_ties_differs_from_onnxruntime_by_at_most_one_step(qkind: tuple) -> None:
    """On values built to sit on half steps, division and multiplication by the reciprocal break
    many ties differently; never by more than one step, and dequantize agrees exactly."""
    qtype, qmin, qmax, np_type = qkind
    g = torch.Generator().manual_seed(4)
    zero_point = torch.tensor((qmin + qmax + 1) // 2, dtype=torch.int32)
    sess = quantize_linear(qtype, 1, 0, None)
    for _ in range(10):
        scale = torch.rand((), generator=g) * 0.1 + 1e-3
        x = ((torch.randint(-140, 140, (10_000,), generator=g) + 0.5) * scale).float()
        feeds = {"x": x.numpy(), "s": scale.numpy(), "z": zero_point.numpy().astype(np_type)}
        ref = sess.run(None, feeds)[0].astype(np.int32)  # type: ignore[attr-defined]
        ours = F.quantize(x, scale, zero_point, qmin, qmax).numpy()
        assert np.abs(ours - ref).max() <= 1


@pytest.mark.parametrize("qkind", [INT8, UINT8], ids=["int8", "uint8"])
@pytest.mark.parametrize("granularity", ["tensor", "axis0", "group"])
def test_dequantize_agrees_with_onnxruntime_exactly(qkind: tuple, granularity: str) -> None:
    from onnx import TensorProto, helper

    qtype, qmin, qmax, np_type = qkind
    g = torch.Generator().manual_seed(5)
    q = torch.randint(qmin, qmax + 1, (12, 32, 5), generator=g, dtype=torch.int32)
    axis, group_size = {"tensor": (None, None), "axis0": (0, None), "group": (1, 8)}[granularity]
    pshape = F.param_shape(q.shape, axis, group_size)
    scale = torch.rand(pshape, generator=g) + 1e-3
    zero_point = torch.randint(qmin, qmax + 1, pshape, generator=g, dtype=torch.int32)
    attrs = {k: v for k, v in (("axis", axis), ("block_size", group_size)) if v is not None}
    pdims = [f"p{i}" for i in range(len(pshape))]
    sess = ort_session(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)],
        [
            helper.make_tensor_value_info("q", qtype, ["a", "b", "c"]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, pdims),
            helper.make_tensor_value_info("z", qtype, pdims),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c"])],
    )
    feeds = {
        "q": q.numpy().astype(np_type),
        "s": scale.numpy(),
        "z": zero_point.numpy().astype(np_type),
    }
    ref = torch.from_numpy(sess.run(None, feeds)[0])  # type: ignore[attr-defined]
    assert_bitwise(F.dequantize(q, scale, zero_point, axis, group_size), ref)


@pytest.fixture(scope="module")
def dynamic_session() -> object:
    from onnx import TensorProto, helper

    return ort_session(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c"])],
    )


def test_dynamic_fake_quantize_matches_onnxruntime_exactly(dynamic_session: object) -> None:
    g = torch.Generator().manual_seed(6)
    batches = [
        normal_data((37, 29), seed=i) * float(torch.rand((), generator=g) * 10)
        + float(torch.randn((), generator=g))
        for i in range(30)
    ]
    batches += [
        torch.zeros(3, 4),
        torch.full((3, 4), 2.5),
        torch.full((3, 4), -1.0),
        torch.rand(50, 50, generator=g) + 3,  # all positive: the range still holds 0
        -torch.rand(50, 50, generator=g) - 3,
        torch.tensor([[1e-30, 2e-30]]),
    ]
    for x in batches:
        ref = torch.from_numpy(dynamic_session.run(None, {"x": x.numpy()})[0])  # type: ignore[attr-defined]
        assert_bitwise(F.dynamic_fake_quantize(x), ref)
    # its gradient passes everything: the range covers the whole tensor
    x = batches[0].clone().requires_grad_(True)
    F.dynamic_fake_quantize(x).sum().backward()
    assert x.grad is not None and bool((x.grad == 1).all())


def test_sqnr_db() -> None:
    ref = torch.tensor([1.0, -2.0, 3.0])
    assert F.sqnr_db(ref, ref) == math.inf
    # signal 14, noise 3 * 0.01
    assert F.sqnr_db(ref, ref + 0.1) == pytest.approx(10 * math.log10(14 / 0.03))


def test_block_int8_fake_quantize_rounds_each_block_of_each_row() -> None:
    """Per row and per block of the last dim: scale amax / 127, codes rounded half to even from
    x * (127 / amax); an all-zero block stays zero; the gradient passes straight through."""
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 1.5, 0.0, 1.0] * 2])
    x.requires_grad_(True)
    y = F.block_int8_fake_quantize(x, 4)
    assert torch.equal(y[0, 4:], torch.zeros(4))
    for row in range(2):
        for b in range(2):
            part = x[row, 4 * b : 4 * b + 4].detach()
            amax = part.abs().max()
            if amax == 0:
                continue
            codes = torch.round(part * (127.0 / amax))
            assert torch.equal(y[row, 4 * b : 4 * b + 4].detach(), codes * (amax / 127.0))
    assert y[0, 0] == 1.0 and y[0, 1] != -0.5  # amax exact; -63.5 rounds to -64 (half to even)
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="not a multiple of block 3"):
        F.block_int8_fake_quantize(x, 3)


def test_nbits_block_size() -> None:
    assert F.nbits_block_size(576, 64) == 64
    assert F.nbits_block_size(576, None) == 64 and F.nbits_block_size(1536, None) == 128
    assert F.nbits_block_size(576, 48) is None and F.nbits_block_size(40, None) is None


def test_nbits_form_and_its_reason_are_one_rule() -> None:
    """functional.nbits_form: the block of a Linear's MatMulNBits form (per-output-channel
    scales or groups of inputs, 4-bit containers for <= 4 bits or 8-bit ones, a power-of-two
    block >= 16), None with a reason where there is none; the rule both the weight-only PTQ and
    the LM export apply."""
    from edgequant.spec import QuantSpec, weight_spec

    assert F.nbits_form(weight_spec(4, 64), 576) == 64
    assert F.nbits_form(weight_spec(4, 64).replace(axis=-1), 576) == 64
    assert F.nbits_form(weight_spec(4), 576) == 64  # per row: the largest block dividing 576
    assert F.nbits_form(weight_spec(4).replace(axis=-2), 1536) == 128
    assert F.nbits_form(weight_spec(8), 576) == 64 and F.nbits_form(weight_spec(2, 16), 64) == 16
    missing = {
        "power of two >= 16 dividing the input size 576": (weight_spec(4, 48), 576),
        "group size 8 is not": (weight_spec(4, 8), 64),
        "input size 40 is not a multiple of 16": (weight_spec(4), 40),
        "per-tensor": (QuantSpec(bits=4), 576),
        "per-channel weights along axis 1": (weight_spec(4).replace(axis=1), 576),
        "groups along axis 0": (weight_spec(4, 64).replace(axis=0), 576),
        "6-bit weights have no MatMulNBits container": (weight_spec(6), 576),
        "5-bit": (weight_spec(5, 64), 576),
        "12-bit": (weight_spec(12), 576),
    }
    for reason, (spec, k) in missing.items():
        assert F.nbits_form(spec, k) is None, reason
        assert reason in F.nbits_form_missing(spec, k)
    # Every grid: a block exactly where there is no reason.
    for bits in range(2, 17):
        for spec in (QuantSpec(bits=bits), weight_spec(bits), weight_spec(bits, 32)):
            for k in (32, 40, 576):
                assert (F.nbits_form(spec, k) is None) == bool(F.nbits_form_missing(spec, k))
