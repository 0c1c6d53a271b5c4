"""Language-model metrics (metrics.py): perplexity and the next-token negative log-likelihood of
each window."""

from __future__ import annotations

import pytest
import torch

from edgequant.metrics import next_token_nll, perplexity


def test_perplexity_of_uniform_logits_is_the_vocabulary_size() -> None:
    ids = torch.randint(0, 50, (3, 9))
    assert perplexity(lambda x: torch.zeros(*x.shape, 50), ids) == pytest.approx(50.0, rel=1e-5)


def test_next_token_nll_scores_each_window_without_its_first_token() -> None:
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # certain and right for both predictions
    logits[0, 2, 0] = 0.0
    nll, count = next_token_nll(logits, ids)
    assert count == 2 and nll == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="logits must be"):
        next_token_nll(logits[0], ids)
