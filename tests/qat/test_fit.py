"""fit_qat: the loop, weight averaging, NaN and divergence, held-out epoch selection, refusal of
bad arguments and data. Checkpoints, FitConfig's checks, distillation and dampening have their
own test modules (test_checkpoint, test_config, test_distill, test_oscillation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from toys import Shuffled  # tests/toys.py

from edgequant.qat import fit_qat, prepare_qat
from edgequant.qat.checkpoint import FILENAME
from edgequant.qat.fit import NaNLossError
from edgequant.qat.prepare import qat_quantizers


def test_weight_average_is_held_after_each_epoch_and_training_goes_on_from_raw_weights(
    tiny_model, calib, make_data, tmp_path
):
    data = Shuffled(*make_data(96, 5))
    kwargs = dict(epochs=3, lr=1e-2, optimizer="adam", teacher=tiny_model, progress=False)

    def weights(model: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in model.parameters()]

    plain = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    plain_history = fit_qat(plain, data, **kwargs)
    seen: list[list[torch.Tensor]] = []
    averaged = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    history = fit_qat(
        averaged,
        data,
        weight_average=0.8,
        on_epoch_end=lambda epoch, record: seen.append(weights(averaged)),
        **kwargs,
    )
    # The average does not steer training: the raw trajectory, and so every loss, is the plain one.
    assert [r["loss"] for r in history] == [r["loss"] for r in plain_history]
    # What each epoch's callback saw, and what is left, is the average, not the raw weights.
    assert all(torch.equal(a, b) for a, b in zip(seen[-1], weights(averaged), strict=True))
    assert any(
        not torch.equal(a, b) for a, b in zip(weights(plain), weights(averaged), strict=True)
    )
    # A near-zero decay averages only the last step: the plain model, up to rounding.
    last = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    fit_qat(last, data, weight_average=1e-12, **kwargs)
    for a, b in zip(weights(plain), weights(last), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="weight_average"):
            fit_qat(last, data, weight_average=bad)
    # Resuming a finished averaged run gives back the average it ended with.
    fit_qat(averaged_again := prepare_qat(tiny_model, "w4a4", calib, start="calibrated"), data, weight_average=0.8,
            checkpoint_dir=tmp_path / "done", **kwargs)  # fmt: skip
    again = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    fit_qat(
        again, data, weight_average=0.8, checkpoint_dir=tmp_path / "done", resume=True, **kwargs
    )
    assert all(
        torch.equal(a, b) for a, b in zip(weights(averaged_again), weights(again), strict=True)
    )
    # A checkpoint of an averaged run cannot be resumed without averaging, nor the other way.
    fit_qat(
        prepare_qat(tiny_model, "w4a4", calib, start="calibrated"),
        data,
        checkpoint_dir=tmp_path,
        **kwargs,
    )
    with pytest.raises(ValueError, match="weight_average"):
        fit_qat(
            prepare_qat(tiny_model, "w4a4", calib, start="calibrated"),
            data,
            checkpoint_dir=tmp_path,
            resume=True,
            weight_average=0.8,
            **{**kwargs, "epochs": 4},
        )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, calib, train_data, tmp_path):
    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    fit_qat(
        qat, train_data, epochs=1, lr=1e-3, checkpoint_dir=tmp_path, progress=False, select="last"
    )
    path = tmp_path / FILENAME
    saved = path.read_bytes()

    class Diverging(torch.nn.Module):
        """A teacher whose second batch of epoch 2 is NaN (what a diverging run produces)."""

        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = tiny_model(x)
            return out * float("nan") if self.calls == 2 else out

    qat2 = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    with pytest.raises(NaNLossError, match=r"epoch 2, step 1.*last good checkpoint"):
        fit_qat(
            qat2,
            train_data,
            epochs=2,
            lr=1e-3,
            teacher=Diverging(),
            kd_weight=0.5,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
            select="last",
        )
    assert path.read_bytes() == saved
    assert not [p for p in tmp_path.iterdir() if p.name != FILENAME]  # no temp files left


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_a_diverging_run_stops_and_keeps_the_start(tiny_model, calib, train_data):
    """SGD at a learning rate far too high destroys the model; select='best' (the default)
    keeps the start, says why, and warns."""
    start = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    qat = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    with pytest.warns(UserWarning, match="stopped: the QAT loss"):
        history = fit_qat(
            qat, train_data, epochs=3, lr=50.0, optimizer="sgd", teacher=tiny_model, progress=False
        )
    chosen = qat.quant_info["qat_selection"]
    assert chosen["kept_epoch"] == 0 and "stopped" in chosen
    assert len(history) < 3  # it stopped early
    x = calib[0]
    assert torch.equal(_outputs(qat, x), _outputs(start, x))
    assert "QAT epoch selection: stopped" in qat.quant_summary.notes[-1]


def test_nan_loss_with_select_best_keeps_the_best_epoch_so_far(tiny_model, calib, train_data):
    class Poisoned(torch.nn.Module):
        """A teacher that outputs NaN once `poison` is set (after epoch 1)."""

        poison = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = tiny_model(x)
            return out * float("nan") if self.poison else out

    teacher = Poisoned()

    def after(epoch: int, record: dict) -> None:
        teacher.poison = True

    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    with pytest.warns(UserWarning, match="became nan at epoch 2, step 0"):
        fit_qat(
            qat,
            train_data,
            epochs=3,
            lr=1e-3,
            teacher=teacher,
            on_epoch_end=after,
            progress=False,
        )
    chosen = qat.quant_info["qat_selection"]
    assert chosen["kept_epoch"] in (0, 1) and len(chosen["heldout_top1"]) == 2
    assert torch.isfinite(_outputs(qat, calib[0])).all()


def test_select_best_keeps_the_epoch_val_fn_prefers(tiny_model, calib, train_data):
    scores = iter([0.5, 0.7, 0.9, 0.6])  # the start, then epochs 1-3

    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    states: list[dict[str, torch.Tensor]] = []
    fit_qat(
        qat,
        train_data,
        epochs=3,
        lr=1e-2,
        val_fn=lambda m: next(scores),
        on_epoch_end=lambda e, r: states.append(
            {k: v.clone() for k, v in qat.state_dict().items() if isinstance(v, torch.Tensor)}
        ),
        progress=False,
    )
    assert qat.quant_info["qat_selection"]["kept_epoch"] == 2
    kept = qat.state_dict()
    assert all(torch.equal(kept[k], states[1][k]) for k in states[1])
    assert not all(torch.equal(kept[k], states[2][k]) for k in states[2])


def test_select_best_holds_out_a_list_and_a_dataloader(tiny_model, calib, make_data):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = make_data(224, 3)
    seen: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_model

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            seen.append(int(batch.shape[0]))
            return self.inner(batch)

    batches = list(zip(x.split(32), y.split(32), strict=True))  # 7 batches: the 7th held out
    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    fit_qat(qat, batches, epochs=1, teacher=Counting(), progress=False)
    assert sum(seen) == 192  # the teacher saw the 6 training batches only
    chosen = qat.quant_info["qat_selection"]
    assert chosen["held_out_predictions"] == 32 and chosen["against"] == "labels"
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    seen.clear()
    fit_qat(qat, loader, epochs=2, teacher=Counting(), progress=False)
    assert sum(seen) == 2 * 192  # every 7th sample held out, the same ones in both epochs
    assert qat.quant_info["qat_selection"]["held_out_predictions"] == 32
    # val_data is used as given, train_data whole.
    seen.clear()
    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    fit_qat(qat, batches, epochs=1, teacher=Counting(), val_data=batches[:2], progress=False)
    assert sum(seen) == 224
    assert qat.quant_info["qat_selection"]["held_out_predictions"] == 64
    with pytest.raises(ValueError, match="val_data chooses"):
        fit_qat(qat, batches, val_data=batches, select="last", progress=False)
    with pytest.raises(ValueError, match="unknown select"):
        fit_qat(qat, batches, select="first", progress=False)


def test_bad_arguments_are_named(tiny_model, calib, train_data):
    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    with pytest.raises(TypeError, match="re-iterable"):
        fit_qat(qat, iter(train_data), progress=False)
    with pytest.raises(ValueError, match="no labels and no teacher"):
        fit_qat(qat, [x for x, _ in train_data], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit_qat(qat, train_data, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        fit_qat(qat, train_data, lr=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        fit_qat(qat, train_data, optimizer="lion")
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        fit_qat(qat, train_data, resume=True)
    with pytest.raises(ValueError, match="no QAT quantizers"):
        fit_qat(tiny_model, train_data)
    with pytest.raises(TypeError, match="item 0"):
        fit_qat(qat, [{"x": 1}], progress=False)
    with pytest.raises(TypeError, match="resume must be True or False.*checkpoint_dir=<folder>"):
        fit_qat(qat, train_data, resume="runs/qat_last.pt")  # type: ignore[arg-type]


def test_a_label_outside_the_models_classes_is_named(tiny_model, calib, train_data):
    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    x, y = train_data[0]
    classes = tiny_model(x).shape[-1]
    bad = [train_data[0], (x, torch.full_like(y, classes))]
    with pytest.raises(ValueError, match=f"has label {classes}, but the model has {classes}"):
        fit_qat(qat, bad, progress=False)


def test_range_lr_scale_sets_how_fast_the_ranges_learn(tiny_model, calib, train_data):
    def ranges(model: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for q in qat_quantizers(model) for p in q.parameters()]

    frozen = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    before, weights = ranges(frozen), [p.detach().clone() for p in frozen.parameters()]
    assert before, "LSQ quantizers have learned step sizes"
    fit_qat(
        frozen,
        train_data,
        epochs=1,
        lr=1e-2,
        optimizer="adam",
        range_lr_scale=0.0,
        progress=False,
        select="last",
    )
    assert all(torch.equal(a, b) for a, b in zip(before, ranges(frozen), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(weights, frozen.parameters(), strict=False))

    moving = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    fit_qat(moving, train_data, epochs=1, lr=1e-2, optimizer="adam", progress=False, select="last")
    assert any(not torch.equal(a, b) for a, b in zip(before, ranges(moving), strict=True))
    with pytest.raises(ValueError, match="range_lr_scale"):
        fit_qat(moving, train_data, range_lr_scale=-1.0)


def test_warmup_rises_to_lr_then_decays(tiny_model, calib, train_data):
    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    history = fit_qat(qat, train_data, epochs=3, lr=1e-3, warmup_epochs=1, progress=False)
    assert history[0]["lr"] == pytest.approx(1e-3)  # the peak, reached as warmup ends
    assert history[1]["lr"] < 1e-3 and history[2]["lr"] == pytest.approx(0.0, abs=1e-12)
    plain = fit_qat(
        prepare_qat(tiny_model, "w8a8", calib, start="calibrated"),
        train_data,
        epochs=3,
        lr=1e-3,
        progress=False,
    )
    assert plain[0]["lr"] < 1e-3
    for bad in (3, -1.0, "1"):
        with pytest.raises(ValueError, match="warmup_epochs"):
            fit_qat(qat, train_data, epochs=3, warmup_epochs=bad)


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


def test_resume_without_a_checkpoint_says_it_starts_afresh(qat, train_data, tmp_path) -> None:
    # Before: silent, so a mistyped folder threw away the run it meant to continue.
    with pytest.warns(UserWarning, match=r"no checkpoint qat_last.pt in .*no such folder"):
        fit_qat(
            qat, train_data, epochs=1, checkpoint_dir=tmp_path / "typo", resume=True, progress=False
        )
    assert (tmp_path / "typo" / "qat_last.pt").is_file()
