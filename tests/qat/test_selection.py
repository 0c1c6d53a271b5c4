"""Which QAT epoch to keep (qat/selection.py): the held-out split, and the rule that keeps the PTQ
start unless an epoch wins beyond noise."""

from __future__ import annotations

import pytest
import torch

from edgequant.qat.selection import holdout_split, select_epoch


def test_select_epoch_keeps_the_ptq_start_unless_an_epoch_wins_beyond_noise() -> None:
    def hits(*right: int, n: int = 100) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.bool)
        out[list(right)] = True
        return out

    start = hits(*range(90))
    # 2 more right and none worse: b - c = 2 <= 2 * sqrt(2), noise: the start stays.
    kept, why = select_epoch([start, hits(*range(92))])
    assert kept == 0 and "PTQ start" in why and "within 2 standard errors" in why
    # 6 more right: 6 > 2 * sqrt(6) = 4.9, kept; the best epoch is the candidate.
    kept, why = select_epoch([start, hits(*range(92)), hits(*range(96)), hits(*range(94))])
    assert kept == 2 and why.startswith("kept epoch 2") and "gets 6 right" in why
    # Paired, not marginal: 8 gained and 8 lost is no gain at all.
    kept, _ = select_epoch([start, hits(*range(8, 98))])
    assert kept == 0
    # An epoch worse than the start is never kept; no change at all is said so.
    kept, why = select_epoch([start, hits(*range(50))])
    assert kept == 0 and "no epoch gained" in why
    assert "no epoch changed a held-out answer" in select_epoch([start, start.clone()])[1]
    assert select_epoch([start])[0] == 0
    # Tied epochs: the latest is the candidate (it trained longest, at the lowest rate).
    kept, why = select_epoch([start, hits(*range(96)), hits(*range(94)), hits(*range(96))])
    assert kept == 3 and why.startswith("kept epoch 3")


def test_epoch_chooser_holds_the_state_of_the_epoch_select_epoch_names() -> None:
    from edgequant.qat.selection import EpochChooser

    model = torch.nn.Linear(1, 1)
    answers = [torch.arange(20) < k for k in (5, 15, 10, 15)]  # epochs 0..3; 1 and 3 tie
    seen = iter(answers)
    chooser = EpochChooser(None, lambda m: next(seen), "labels")
    chooser.start(model)
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(epoch)
        chooser.score(epoch, model, {})
    assert chooser.best is not None and chooser.best[0] == 3
    assert float(chooser.best[2]["weight"]) == 3.0
    assert select_epoch(answers)[0] == 3


def test_holdout_split_is_strided_and_needs_two_batches() -> None:
    batches = list(range(15))
    fit, held = holdout_split(batches)  # type: ignore[arg-type]
    assert held == [6, 13] and fit == [b for b in batches if b not in (6, 13)]
    assert holdout_split([0, 1, 2]) == ([0, 1], [2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 batches"):
        holdout_split([0])  # type: ignore[arg-type]
    for every in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match="every must be an int >= 2"):
            holdout_split(batches, every)  # type: ignore[arg-type]


def test_select_epoch_names_bad_hits() -> None:
    start = torch.zeros(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="hits is empty"):
        select_epoch([])
    with pytest.raises(ValueError, match=r"hits\[1\] must be a bool tensor"):
        select_epoch([start, torch.zeros(10)])
    with pytest.raises(ValueError, match=r"hits\[1\] must be a bool tensor"):
        select_epoch([start, torch.zeros(9, dtype=torch.bool)])
    with pytest.raises(ValueError, match="z must be a number >= 0"):
        select_epoch([start, start], z=-1.0)
