"""modules.py: BatchNorm folding, quantized Conv1d/Conv2d/Linear against PyTorch's fake-quantize
references (grouped and depthwise convs included), the INT32 bias rule, from_float's copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn
from toys import bitwise_equal, gen, rel_err  # tests/toys.py

from edgequant.functional import sqnr_db
from edgequant.modules import (
    QUANT_MODULES,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    fold_batchnorm,
    from_float,
)
from edgequant.spec import activation_spec, weight_spec


def _random_bn(bn: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics and affine parameters, eval mode."""
    g = gen(seed)
    with torch.no_grad():
        n = bn.running_mean.numel()
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))
    return bn.eval()


# --- BatchNorm folding --------------------------------------------------------------------------

CONV_BN_CASES = {
    "conv2d": (lambda: nn.Conv2d(3, 8, 3, padding=1), lambda: nn.BatchNorm2d(8), (4, 3, 9, 9)),
    "conv2d-nobias": (
        lambda: nn.Conv2d(3, 8, 3, bias=False),
        lambda: nn.BatchNorm2d(8),
        (4, 3, 9, 9),
    ),
    "depthwise": (
        lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
        lambda: nn.BatchNorm2d(8),
        (2, 8, 7, 7),
    ),
    "grouped-strided": (
        lambda: nn.Conv2d(6, 12, 3, stride=2, groups=3, dilation=1),
        lambda: nn.BatchNorm2d(12),
        (2, 6, 11, 11),
    ),
    "conv1d": (lambda: nn.Conv1d(4, 6, 5, padding=2), lambda: nn.BatchNorm1d(6), (3, 4, 20)),
    "linear": (lambda: nn.Linear(10, 7), lambda: nn.BatchNorm1d(7), (16, 10)),
    "bn-not-affine": (
        lambda: nn.Conv2d(3, 5, 1),
        lambda: nn.BatchNorm2d(5, affine=False),
        (2, 3, 4, 4),
    ),
}


@pytest.mark.parametrize("case", sorted(CONV_BN_CASES))
def test_bn_folding_equals_layer_then_bn(case: str) -> None:
    make_layer, make_bn, shape = CONV_BN_CASES[case]
    torch.manual_seed(0)
    layer, bn = make_layer().eval(), _random_bn(make_bn(), seed=1)
    x = torch.randn(*shape, generator=gen(2))
    with torch.no_grad():
        expected = bn(layer(x))
        folded = from_float(layer, weight_spec(8), activation_spec(8), "layer", bn=bn)
        # Quantizers exist but are disabled: the folded float layer alone.
        assert folded.weight_quantizer.mode == folded.input_quantizer.mode == "disabled"
        actual = folded(x)
    assert type(folded) is QUANT_MODULES[type(layer)]
    assert folded.bias is not None
    assert rel_err(actual, expected) < 1e-5


def test_fold_batchnorm_formula() -> None:
    bn = _random_bn(nn.BatchNorm2d(4), seed=3)
    w = torch.randn(4, 2, 3, 3, generator=gen(4))
    b = torch.randn(4, generator=gen(5))
    w_f, b_f = fold_batchnorm(w, b, bn)
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(w_f, w * factor.reshape(4, 1, 1, 1), rtol=1e-6, atol=0)
    assert torch.allclose(b_f, (b - bn.running_mean) * factor + bn.bias, rtol=1e-6, atol=1e-7)
    assert not w_f.requires_grad and not b_f.requires_grad


def test_fold_batchnorm_without_running_stats_raises() -> None:
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm(torch.randn(4, 1, 1, 1), None, bn)


# --- quantized layers against references --------------------------------------------------------


def _calibrate(layer: nn.Module, x: torch.Tensor) -> None:
    layer.weight_quantizer.calibrate_tensor(layer.weight)
    layer.weight_quantizer.set_mode("quantize")
    if layer.input_quantizer is not None:
        layer.input_quantizer.calibrate_tensor(x)
        layer.input_quantizer.set_mode("quantize")


def _reference_inputs(
    layer: nn.Module, x: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    iq, wq = layer.input_quantizer, layer.weight_quantizer
    x_q = torch.fake_quantize_per_tensor_affine(x, float(iq.scale), int(iq.zero_point), 0, 255)
    qmax = 2 ** (bits - 1) - 1
    w_q = torch.fake_quantize_per_channel_affine(
        layer.weight, wq.scale, wq.zero_point, 0, -qmax - 1, qmax
    )
    return x_q, w_q


CONV_CASES = {
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 8, 8)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 8, 8)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (2, 6, 9, 9)),
    "depthwise-multiplier": (lambda: nn.Conv2d(4, 8, 3, groups=4), (2, 4, 6, 6)),
    "reflect-pad": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2), (2, 4, 12)),
    "linear": (lambda: nn.Linear(12, 5), (7, 12)),
}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_quantized_layer_matches_pytorch_reference(case: str, bits: int) -> None:
    make, shape = CONV_CASES[case]
    torch.manual_seed(6)
    float_layer = make().eval()
    x = torch.randn(*shape, generator=gen(7))
    layer = from_float(float_layer, weight_spec(bits), activation_spec(8), case)
    _calibrate(layer, x)
    x_q, w_q = _reference_inputs(layer, x, bits)
    # The bias as the layer quantizes it: INT32 on the grid s_in * s_w, checked separately below.
    _, _, b_q = layer.quantized_inputs(x)
    with torch.no_grad():
        if isinstance(float_layer, nn.Linear):
            expected = torch_F.linear(x_q, w_q, b_q)
        else:
            expected = float_layer._conv_forward(x_q, w_q, b_q)
        # Training mode runs the fake-quantized float form: PyTorch's reference, bit for bit.
        actual = layer.train()(x)
        # Eval mode runs the integer form (exact integer sums, then one scaling per channel):
        # the same numbers up to float rounding.
        integer = layer.eval()(x)
    assert bitwise_equal(actual, expected)
    assert sqnr_db(expected, integer) > 100.0
    # Grouping survives the swap.
    if not isinstance(float_layer, nn.Linear):
        assert layer.groups == float_layer.groups
        assert layer.padding_mode == float_layer.padding_mode


def test_registry_maps_float_types() -> None:
    assert {
        nn.Conv1d: QuantConv1d,
        nn.Conv2d: QuantConv2d,
        nn.Linear: QuantLinear,
        nn.Embedding: QuantEmbedding,
    } == QUANT_MODULES
    q = from_float(nn.Conv2d(2, 2, 1), weight_spec(8), None, "c")
    assert isinstance(q, nn.Conv2d)  # still a Conv2d to the user's code


def test_from_float_rejects_unsupported_layers() -> None:
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        from_float(nn.ConvTranspose2d(2, 2, 3), weight_spec(8), None, "up")


# --- bias ---------------------------------------------------------------------------------------


def _layer_with_off_grid_bias(act: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, generator=gen(9))
    layer = from_float(conv, weight_spec(8), activation_spec(8) if act else None, "conv")
    _calibrate(layer, x)
    return layer, x


def test_bias_is_int32_on_input_times_weight_scale_when_statically_quantized() -> None:
    layer, _ = _layer_with_off_grid_bias(act=True)
    s_in, s_w = layer.input_quantizer.scale, layer.weight_quantizer.scale
    bias_scale = layer.bias_scale()
    assert bias_scale is not None
    assert bitwise_equal(bias_scale, (s_in * s_w).float())
    # Put each bias 0.37 steps off its grid: the layer must use the rounded value.
    steps = torch.tensor([3.37, -1200.37, 0.37, 2.0**20 + 0.37])
    with torch.no_grad():
        layer.bias.copy_(steps * bias_scale)
        zeros = torch.zeros(1, 3, 6, 6)
        assert float(layer.input_quantizer(zeros).abs().max()) == 0.0  # 0 is on the input grid
        out = layer(zeros)[0, :, 0, 0]
    in_steps = out / bias_scale
    assert torch.allclose(in_steps, steps.round(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("input_mode", ["none", "dynamic", "disabled"])
def test_bias_stays_float_without_static_input_quantization(input_mode: str) -> None:
    layer, _ = _layer_with_off_grid_bias(act=input_mode != "none")
    if input_mode != "none":
        layer.input_quantizer.set_mode(input_mode)
    assert layer.bias_scale() is None
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([3.37e-5, -1.2e-3, 0.5, 7.25]))
        out = layer(torch.zeros(1, 3, 6, 6))[0, :, 0, 0]
    assert torch.equal(out, layer.bias.detach())


def test_bias_stays_float_with_weight_quantizer_disabled() -> None:
    layer, _ = _layer_with_off_grid_bias(act=True)
    layer.weight_quantizer.set_mode("disabled")
    assert layer.bias_scale() is None


def test_bias_stays_float_with_group_weights() -> None:
    torch.manual_seed(10)
    lin = nn.Linear(8, 4)
    layer = from_float(lin, weight_spec(4, group_size=4), activation_spec(8), "fc")
    _calibrate(layer, torch.randn(5, 8, generator=gen(11)))
    assert layer.weight_quantizer.scale.shape == (4, 2)
    assert layer.bias_scale() is None


# --- from_float leaves the original alone -------------------------------------------------------


def test_from_float_does_not_modify_or_alias_the_original() -> None:
    torch.manual_seed(12)
    conv, bn = nn.Conv2d(3, 4, 3), _random_bn(nn.BatchNorm2d(4), seed=13)
    conv.train()
    before_conv = {k: v.clone() for k, v in conv.state_dict().items()}
    before_bn = {k: v.clone() for k, v in bn.state_dict().items()}
    q = from_float(conv, weight_spec(4), activation_spec(4), "conv", bn=bn)
    assert q.training  # follows the original's mode
    x = torch.randn(2, 3, 6, 6, generator=gen(14))
    _calibrate(q, x)
    with torch.no_grad():
        q(x)
        q.weight.mul_(2.0)
        q.bias.add_(1.0)
    for k, v in conv.state_dict().items():
        assert torch.equal(v, before_conv[k]), k
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before_bn[k]), k
    assert q.weight.data_ptr() != conv.weight.data_ptr()
    assert conv.training and not hasattr(conv, "weight_quantizer")
