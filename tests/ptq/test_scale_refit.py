"""The scale refit (ptq/scale_refit.py): closed-form scales for fixed codes, against the output
error it minimises, and its switch in the decoder pipeline."""

from __future__ import annotations

import pytest
import torch
from toys import lm_recipe, relu_mlp, tiny_llama, token_batches  # tests/toys.py

import edgequant as eq
from edgequant.ptq.scale_refit import refit_scales


def output_error(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> float:
    e = (deq - w).double()
    return float(((e @ h.double()) * e).sum())


def rtn(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit round to nearest per group: (codes, scales (out, groups))."""
    wg = w.reshape(w.shape[0], groups, -1)
    scale = wg.abs().amax(dim=2) / 7
    codes = torch.clamp(torch.round(wg / scale.unsqueeze(2)), -8, 7)
    return codes.reshape(w.shape), scale


def dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    groups = scale.shape[1]
    return (codes.reshape(codes.shape[0], groups, -1) * scale.unsqueeze(2)).reshape(codes.shape)


@pytest.mark.parametrize("groups", [1, 4])
def test_refit_lowers_the_output_error_and_is_its_least_squares_minimum(groups: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 32, generator=g)
    x = torch.randn(256, 32, generator=g) * torch.linspace(0.1, 3.0, 32)  # unequal channels
    h = x.T @ x
    codes, scale = rtn(w, groups)
    new = refit_scales(w, codes, scale, h)
    before, after = (
        output_error(w, dequant(codes, scale), h),
        output_error(w, dequant(codes, new), h),
    )
    assert after < 0.99 * before
    # A minimum: nudging any one row's scales either way costs more.
    for delta in (1.01, 0.99):
        nudged = new.clone()
        nudged[3] *= delta
        assert output_error(w, dequant(codes, nudged), h) > after


def test_refit_keeps_the_scales_of_an_all_zero_group() -> None:
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    codes, scale = rtn(w, 2)
    codes[:, :8] = 0
    new = refit_scales(w, codes, scale, torch.eye(16))
    assert torch.equal(new[:, 0], scale[:, 0])


def test_group_count_that_does_not_divide_the_inputs_is_refused() -> None:
    with pytest.raises(ValueError, match="3 groups do not divide 16 inputs"):
        refit_scales(torch.zeros(2, 16), torch.zeros(2, 16), torch.ones(2, 3), torch.eye(16))


def test_decoder_pipeline_refits_only_when_the_recipe_asks_and_records_why() -> None:
    pytest.importorskip("transformers")
    model = tiny_llama()
    data = token_batches(4, 32)
    on = eq.quantize(
        model, lm_recipe(4, 32, scale_refit=True), calib_data=data, method="weight_only"
    )
    auto = eq.quantize(model, lm_recipe(4, 32), calib_data=data, method="weight_only")
    pipeline = auto.quant_info["pipeline"]
    assert not pipeline["scale_refit"]
    assert pipeline["reasons"]["scale_refit"].startswith("off: ")
    assert "scale refit to the codes by output error" not in pipeline["steps"]
    assert on.quant_info["pipeline"]["reasons"]["scale_refit"] == "recipe"
    assert "scale refit to the codes by output error" in on.quant_info["pipeline"]["steps"]
    layer_on = on.model.layers[0].mlp.down_proj
    layer_auto = auto.model.layers[0].mlp.down_proj
    # Same codes (GPTQ ran on the same grid), other scales; the weight stays on its grid.
    wq_on, wq_auto = layer_on.weight_quantizer, layer_auto.weight_quantizer
    assert not torch.equal(wq_on.scale, wq_auto.scale)
    codes_on = torch.round(layer_on.weight / wq_on.scale.repeat_interleave(32, dim=1))
    codes_auto = torch.round(layer_auto.weight / wq_auto.scale.repeat_interleave(32, dim=1))
    assert torch.equal(codes_on, codes_auto)
    assert torch.equal(wq_on(layer_on.weight), layer_on.weight.detach())


@pytest.mark.parametrize("group", [None, 32])
def test_refitted_scales_export_to_matmulnbits_and_verify(tmp_path, group: int | None) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    from edgequant.export.lm import export_lm_onnx

    model = tiny_llama()
    recipe = lm_recipe(4, group, scale_refit=True, block_int8_inputs=False)
    q = eq.quantize(model, recipe, calib_data=token_batches(4, 32), method="weight_only")
    assert q.quant_info["pipeline"]["scale_refit"]
    held_out = torch.cat([b["input_ids"] for b in token_batches(4, 32, seed=5)])
    info = export_lm_onnx(q, tmp_path / "lm.onnx", verify_windows=held_out)
    assert info.agreement is not None and info.agreement >= 0.99
    assert info.matmul_nbits == 2 * 7


def test_scale_refit_on_a_model_without_a_decoder_stack_is_refused_by_name() -> None:
    data = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(ValueError, match="scale_refit run in the decoder pipeline"):
        eq.quantize(
            relu_mlp(16, 32, 4),
            lm_recipe(4, None, scale_refit=True),
            calib_data=data,
            method="weight_only",
        )
