"""The per-tensor LSQ kernels against PyTorch's fused learnable fake-quantize."""

from __future__ import annotations

import pytest
import torch

from edgequant.qat import kernels
from edgequant.qat.kernels import COMPILE_MIN_NUMEL, lsq_fake_quantize_per_tensor


def _reference(x, scale, zero_point, qmin, qmax, g):
    x = x.clone().requires_grad_(True)
    s = scale.clone().reshape(1).requires_grad_(True)
    z = zero_point.clone().reshape(1).requires_grad_(True)
    y = torch._fake_quantize_learnable_per_tensor_affine(x, s, z, qmin, qmax, g)
    return y, x, s, z


def _ours(x, scale, zero_point, qmin, qmax, g):
    x = x.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    z = zero_point.clone().requires_grad_(True)
    y = lsq_fake_quantize_per_tensor(x, s, z, qmin, qmax, g)
    return y, x, s, z


@pytest.mark.parametrize(("qmin", "qmax", "zp"), [(0, 15, 3.0), (-8, 7, 0.0), (0, 255, 128.0)])
def test_kernel_math_equals_pytorch_fused_op(monkeypatch, qmin, qmax, zp):
    monkeypatch.setenv("EDGEQUANT_QAT_COMPILE", "0")  # the eager form of the compiled math
    torch.manual_seed(0)
    x = torch.randn(COMPILE_MIN_NUMEL + 5) * 3
    scale, zero_point = torch.tensor(0.21), torch.tensor(zp)
    upstream = torch.randn_like(x)
    ref = _reference(x, scale, zero_point, qmin, qmax, 0.05)
    got = _ours(x, scale, zero_point, qmin, qmax, 0.05)
    assert torch.equal(ref[0], got[0])  # forward bit for bit
    ref[0].backward(upstream)
    got[0].backward(upstream)
    assert torch.equal(ref[1].grad, got[1].grad)  # straight-through estimator, same mask
    torch.testing.assert_close(got[2].grad.reshape(1), ref[2].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[3].grad.reshape(1), ref[3].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_kernels_equal_pytorch_fused_op(monkeypatch):
    monkeypatch.setenv("EDGEQUANT_QAT_COMPILE", "1")
    torch.manual_seed(1)
    x = torch.randn(8, 16, 32, 32) * 2
    scale, zero_point = torch.tensor(0.13), torch.tensor(5.0)
    upstream = torch.randn_like(x)
    ref = _reference(x, scale, zero_point, 0, 15, 0.01)
    got = _ours(x, scale, zero_point, 0, 15, 0.01)
    assert not kernels._BROKEN, kernels._BROKEN
    assert torch.equal(ref[0], got[0])
    ref[0].backward(upstream)
    got[0].backward(upstream)
    assert torch.equal(ref[1].grad, got[1].grad)
    torch.testing.assert_close(got[2].grad.reshape(1), ref[2].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[3].grad.reshape(1), ref[3].grad, rtol=1e-4, atol=1e-5)
