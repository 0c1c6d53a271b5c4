"""Bad arguments to eq.prepare_qat and eq.fit_qat: refused where they enter (or at the first batch
that shows them), with the argument and the value named; the caller's models are left as given."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.qat.fit import fit_qat
from edgequant.qat.prepare import prepare_qat


@pytest.fixture
def qat(tiny_model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    return prepare_qat(tiny_model, "w8a8", calib)


@pytest.mark.parametrize("made_by", ["eq.quantize", "eq.prepare_qat"])
def test_prepare_qat_refuses_a_quantized_model(tiny_model, calib, made_by: str) -> None:
    # Before: "the model has no quantizable layer ... (conv1.weight_quantizer: no quantized
    # version of this layer type; ...)".
    if made_by == "eq.quantize":
        quantized = eq.quantize(tiny_model, "w8a8", calib)
    else:
        quantized = prepare_qat(tiny_model, "w8a8", calib)
    with pytest.raises(ValueError, match=f"model is already quantized by {made_by} .*FP32 model"):
        prepare_qat(quantized, "w8a8", calib)


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


@pytest.mark.parametrize("name", ["val_fn", "on_epoch_end"])
def test_fit_qat_refuses_callbacks_that_are_not_callable(qat, train_data, name: str) -> None:
    # Before: "'float' object is not callable", after a whole epoch of training.
    with pytest.raises(TypeError, match=f"{name} must be callable or None, got float 0.5"):
        fit_qat(qat, train_data, progress=False, **{name: 0.5})


def test_fit_qat_names_what_val_fn_returned(qat, train_data) -> None:
    # Before: "only one element tensors can be converted to Python scalars".
    with pytest.raises(
        TypeError, match=r"val_fn must return a number .* model as prepared .* shape \(2,\)"
    ):
        fit_qat(qat, train_data, epochs=1, progress=False, val_fn=lambda m: torch.ones(2))


def test_fit_qat_checkpoint_dir_that_is_a_file(qat, train_data, tmp_path: Path) -> None:
    # Before: FileExistsError from mkdir, after the arguments had all been accepted.
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ValueError, match=r"checkpoint_dir=.*/runs' is a file, not a folder"):
        fit_qat(qat, train_data, progress=False, checkpoint_dir=tmp_path / "runs" / "qat")


def test_fit_qat_refuses_nan_inputs(qat, train_data) -> None:
    # Before: fake-quantize mapped the NaNs to grid points, the loss stayed finite and the model
    # trained on them without a word.
    x, y = train_data[1]
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    data = [train_data[0], (x, y)]
    with pytest.raises(ValueError, match=r"train_data item 1 \(epoch 1\) holds NaN or Inf"):
        fit_qat(qat, data, epochs=1, progress=False, select="last")
    # Held out (the default select="best" holds out the last of two batches): named too.
    with pytest.raises(ValueError, match=r"held-out batch 0 holds NaN or Inf .*1 of"):
        fit_qat(qat, data, epochs=1, progress=False)


def test_fit_qat_teacher_with_other_outputs(qat, train_data) -> None:
    # Before: "The size of tensor a (10) must match the size of tensor b (4) at non-singleton
    # dimension 1", from inside kl_div.
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with pytest.raises(
        ValueError, match=r"teacher output has shape \(32, 10\) .* model's \(32, 4\)"
    ):
        fit_qat(qat, train_data, epochs=1, progress=False, teacher=teacher)


def test_fit_qat_leaves_the_teachers_mode_as_given(qat, tiny_model, train_data) -> None:
    # Before: the teacher (the caller's FP32 model) was left in eval mode.
    teacher = tiny_model.train()
    fit_qat(qat, train_data, epochs=1, progress=False, teacher=teacher)
    assert all(m.training for m in teacher.modules())


def test_prepare_qat_refuses_a_pattern_that_matches_no_layer(tiny_model, calib) -> None:
    # Before: eq.quantize refused it, prepare_qat trained with the typo'd layer at the defaults.
    recipe = eq.Recipe.preset("w4a4").replace(skip=("conv9",))
    with pytest.raises(ValueError, match="skip pattern 'conv9' matches no module of the model"):
        prepare_qat(tiny_model, recipe, calib)


def test_resume_without_a_checkpoint_says_it_starts_afresh(qat, train_data, tmp_path) -> None:
    # Before: silent, so a mistyped folder threw away the run it meant to continue.
    with pytest.warns(UserWarning, match=r"no checkpoint qat_last.pt in .*no such folder"):
        fit_qat(
            qat, train_data, epochs=1, checkpoint_dir=tmp_path / "typo", resume=True, progress=False
        )
    assert (tmp_path / "typo" / "qat_last.pt").is_file()
