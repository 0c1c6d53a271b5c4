"""qat/checkpoint.py: a checkpoint resumes to identical weights (the data order's random state
included); a checkpoint of another recipe or model is refused, naming the difference."""

from __future__ import annotations

import pytest
import torch
from toys import Shuffled  # tests/toys.py

import edgequant as eq
from edgequant.qat import fit_qat, prepare_qat
from edgequant.qat.checkpoint import FILENAME
from edgequant.qat.ema import EMAQuantizer


class Stop(Exception):
    pass


def _stop_after_first(epoch: int, record: dict) -> None:
    if epoch == 1:
        raise Stop


@pytest.mark.parametrize(
    ("range_learning", "weight_average"), [("lsq", 0.0), ("ema", 0.0), ("lsq", 0.8)]
)
def test_resume_after_a_kill_gives_identical_weights(
    tiny_model, calib, make_data, tmp_path, range_learning, weight_average
):
    recipe = eq.Recipe.preset("w4a4").replace(range_learning=range_learning)
    data = Shuffled(*make_data(96, 5))
    kwargs = dict(
        epochs=3,
        lr=1e-2,
        optimizer="adam",
        teacher=tiny_model,
        kd_weight=0.5,
        progress=False,
        seed=7,
        freeze_observers_epoch=2,
        weight_average=weight_average,
    )
    straight = prepare_qat(tiny_model, recipe, calib, start="calibrated")
    fit_qat(straight, data, checkpoint_dir=tmp_path / "a", **kwargs)

    interrupted = prepare_qat(tiny_model, recipe, calib, start="calibrated")
    with pytest.raises(Stop):
        fit_qat(
            interrupted,
            data,
            checkpoint_dir=tmp_path / "b",
            on_epoch_end=_stop_after_first,
            **kwargs,
        )
    assert (tmp_path / "b" / FILENAME).is_file()
    torch.manual_seed(12345)  # whatever happened in between must not matter
    resumed = prepare_qat(
        tiny_model, recipe, calib, start="calibrated"
    )  # a new process would rebuild it
    history = fit_qat(resumed, data, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    if range_learning == "ema":
        assert all(q.frozen for q in resumed.modules() if isinstance(q, EMAQuantizer))
    # Training changed something (the comparison above is not between two untouched models).
    start = prepare_qat(tiny_model, recipe, calib, start="calibrated").state_dict()
    assert any(not torch.equal(start[k], a[k]) for k in a if k.endswith("weight"))


def test_checkpoint_of_another_recipe_is_refused(tiny_model, calib, train_data, tmp_path):
    qat = prepare_qat(tiny_model, "w8a8", calib, start="calibrated")
    fit_qat(qat, train_data, epochs=1, checkpoint_dir=tmp_path, progress=False)
    other = prepare_qat(tiny_model, "w4a4", calib, start="calibrated")
    with pytest.raises(
        ValueError,
        match=r"different recipe or model(.|\n)*recipe field 'name': checkpoint 'w8a8', this model 'w4a4'",
    ):
        fit_qat(other, train_data, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    lsq_plus = prepare_qat(
        tiny_model, eq.Recipe.preset("w8a8").replace(range_learning="lsq+"), calib
    )
    with pytest.raises(ValueError, match="range_learning"):
        fit_qat(
            lsq_plus, train_data, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False
        )
