"""A prepared model under DistributedDataParallel: 2 processes, gloo, CPU. Quantizer state must
be identical on both ranks, EMA ranges synchronized by all_reduce (buffers are *not* broadcast
from rank 0 here, so equality can only come from the synchronization)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import edgequant as eq
from edgequant.qat import prepare_qat

WORLD = 2
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    return model.eval()


def _rank_data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    # Rank 1 sees a wider input range: rank 0 alone would track a different range.
    x = torch.randn(16, 3, 8, 8, generator=g) * (1.0 + 2.0 * rank)
    return x, torch.randint(0, 4, (16,), generator=g)


def _calib() -> list[torch.Tensor]:
    return list(torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(7)).split(16))


def _worker(rank: int, init_file: str, out_dir: str, range_learning: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        recipe = eq.Recipe.preset("w8a8").replace(range_learning=range_learning)
        qmodel = prepare_qat(_model(), recipe, _calib(), start="calibrated")
        ddp = nn.parallel.DistributedDataParallel(qmodel, broadcast_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for step in range(STEPS):
            x, y = _rank_data(rank, step)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        qmodel.eval()
        state = {k: v for k, v in qmodel.state_dict().items() if "quantizer" in k}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("range_learning", ["ema", "lsq"])
def test_quantizer_state_is_identical_on_both_ranks(tmp_path: Path, range_learning: str) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path), range_learning),
        nprocs=WORLD,
        join=True,
    )
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert states[0].keys() == states[1].keys() and len(states[0]) > 4
    for key, value in states[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, states[1][key]), key
        else:
            assert value == states[1][key], key  # the modes (extra state)
    if range_learning == "ema":
        # The first layer's input range is the EMA of the *global* batch min/max.
        start = prepare_qat(
            _model(), eq.Recipe.preset("w8a8").replace(range_learning="ema"), _calib()
        )
        q = start.get_submodule("0").input_quantizer
        lo, hi = q.running_min.clone(), q.running_max.clone()
        for step in range(STEPS):
            xs = [_rank_data(r, step)[0] for r in range(WORLD)]
            lo = lo + 0.01 * (torch.stack([x.min() for x in xs]).min() - lo)
            hi = hi + 0.01 * (torch.stack([x.max() for x in xs]).max() - hi)
        key = next(
            k for k in states[0] if k.endswith("input_quantizer.running_max") and k.startswith("0.")
        )
        torch.testing.assert_close(states[0][key], hi)
        torch.testing.assert_close(states[0][key.replace("max", "min")], lo)
