"""EMA ranges in QAT (qat/ema.py): they follow the data until the observers are frozen."""

from __future__ import annotations

import torch

import edgequant as eq
from edgequant.qat import freeze_observers, prepare_qat
from edgequant.qat.ema import EMAQuantizer


def test_ema_ranges_follow_the_data_until_frozen(tiny_model, calib):
    qat = prepare_qat(tiny_model, eq.Recipe.preset("w8a8").replace(range_learning="ema"), calib)
    q = qat.get_submodule("conv1").input_quantizer
    assert isinstance(q, EMAQuantizer)
    before = q.scale.clone()
    qat(calib[0] * 4)  # a wider range
    after = q.scale.clone()
    assert float(after) > float(before)
    assert freeze_observers(qat) > 0
    qat(calib[0] * 16)
    assert torch.equal(q.scale, after)
