"""qat/config.py: FitConfig resolves the learning-rate defaults by its rule (explicit settings
win) and refuses bad settings by name, made directly or by fit_qat from its keywords."""

from __future__ import annotations

import pytest

from edgequant.qat import fit_qat
from edgequant.qat.config import FitConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # Before: silently trained (weight_decay NaN: loss in the thousands; momentum 2 accepted)
        # or failed in torch ("Invalid momentum value: -0.5") or in a comparison with a str.
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0, got nan"),
        ({"momentum": 2.0}, r"momentum must be a number in \[0, 1\), got 2.0"),
        ({"momentum": -0.5}, r"momentum must be a number in \[0, 1\), got -0.5"),
        ({"temperature": "4"}, "temperature must be a number > 0, got '4'"),
        ({"kd_weight": "0.5"}, r"kd_weight must be a number in \[0, 1\], got '0.5'"),
    ],
)
def test_fit_qat_refuses_bad_numbers(qat, train_data, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_qat(qat, train_data, progress=False, **kwargs)


def test_defaults_resolve_by_optimizer_and_explicit_settings_win():
    assert FitConfig().rates() == ("grid", 0.01, 0.1)
    assert FitConfig(optimizer="sgd").rates() == ("none", 1e-4, 1.0)
    assert FitConfig(optimizer="sgd", lr_scaling="grid").rates() == ("grid", 0.01, 0.1)
    assert FitConfig(lr=0.5, range_lr_scale=0.0).rates() == ("grid", 0.5, 0.0)
    # replace() on an unresolved config keeps None meaning "by the rule".
    assert FitConfig().replace(lr_scaling="none").rates() == ("none", 1e-4, 1.0)
    with pytest.raises(ValueError, match="unknown lr_scaling 'step'; valid: grid, none"):
        FitConfig(lr_scaling="step")
    with pytest.raises(ValueError, match="lr must be a positive number or None"):
        FitConfig(lr=0.0)
