"""What learned rounding reconstructs (Recipe.rounding_target) and the input-error target's
damping (regularised towards the float weight, not towards zero)."""

from __future__ import annotations

import pytest
import torch
from toys import SeededMLP  # tests/toys.py

import edgequant as eq
from edgequant.ptq.gptq import input_error_target
from edgequant.spec import activation_spec, weight_spec


def _outlier_inputs(n: int = 512, cols: int = 32, seed: int = 0) -> torch.Tensor:
    """Rows with two outlier channels 100x the others, as transformer hidden states have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g)
    x[:, :2] *= 100.0
    return x


def test_input_error_target_is_the_weight_when_inputs_carry_no_error() -> None:
    x = _outlier_inputs()
    w = torch.randn(8, x.shape[1], generator=torch.Generator().manual_seed(1))
    h = (2.0 / x.shape[0]) * (x.T @ x).double()
    # No input error (X_q = X_f): the target must be W itself, whatever the damping; damping
    # towards 0 shrank the weights of the small channels here to 10-70 % of their value.
    target = input_error_target(w, h, h.clone(), damp=0.01)
    torch.testing.assert_close(target, w, rtol=0, atol=1e-5)


def test_input_error_target_corrects_a_known_input_error() -> None:
    # X_q = X_f * 0.9 on every channel: the target that reproduces W X_f is W / 0.9.
    xf = _outlier_inputs()
    xq = 0.9 * xf
    w = torch.randn(8, xf.shape[1], generator=torch.Generator().manual_seed(2))
    n = xf.shape[0]
    h = (2.0 / n) * (xq.T @ xq).double()
    cross = (2.0 / n) * (xq.T @ xf).double()
    target = input_error_target(w, h, cross, damp=1e-6)
    torch.testing.assert_close(target, w / 0.9, rtol=1e-3, atol=1e-3)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(32, 32, generator=g) for _ in range(2)]


@pytest.mark.parametrize(
    ("method", "rounding_target", "resolved"),
    [
        ("weight_only", "auto", "quantized"),
        ("static", "auto", "quantized"),  # 8-bit activations
        ("static-a4", "auto", "float"),  # coarse inputs: the float target absorbs their error
        ("static-w3", "auto", "float"),  # coarse weights: errors compound without it
        ("weight_only-w2", "auto", "float"),
        ("weight_only", "float", "float"),
        ("static", "quantized", "quantized"),
    ],
)
def test_rounding_target_resolves_and_is_recorded(
    method: str, rounding_target: str, resolved: str
) -> None:
    recipe = eq.Recipe(
        weight=weight_spec(int(method[-1]) if "-w" in method else 4, group_size=16),
        activation=None
        if method.startswith("weight_only")
        else activation_spec(4 if "a4" in method else 8),
        rounding="gptq",
        rounding_target=rounding_target,
    )
    q = eq.quantize(SeededMLP(), recipe, _batches(), method=method.split("-")[0])
    pipeline = q.quant_info["pipeline"]
    assert pipeline["rounding_target"] == resolved
    assert "gptq weight rounding" in pipeline["steps"]
    assert q.quant_info["recipe"]["rounding_target"] == rounding_target


def test_rounding_targets_give_different_weights_in_weight_only() -> None:
    weights = {}
    for target in ("float", "quantized"):
        recipe = eq.Recipe(
            weight=weight_spec(4, group_size=16),
            activation=None,
            rounding="gptq",
            rounding_target=target,
            bias_correction=False,
        )
        q = eq.quantize(SeededMLP(), recipe, _batches(), method="weight_only")
        weights[target] = q.get_submodule("fc2").weight.detach().clone()
    # fc2's input differs between the float and the quantized model (fc1 is rounded), so the
    # two targets must round fc2 differently.
    assert not torch.equal(weights["float"], weights["quantized"])


def test_rounding_target_is_validated_and_round_trips() -> None:
    with pytest.raises(ValueError, match="rounding_target='input'.*valid: auto, float, quantized"):
        eq.Recipe(rounding_target="input")
    recipe = eq.Recipe(rounding_target="quantized")
    assert eq.Recipe.from_dict(recipe.to_dict()) == recipe
