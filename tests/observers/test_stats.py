"""The statistics the observers keep (observers/stats.py): the growing histogram."""

from __future__ import annotations

import numpy as np
import torch

from edgequant.observers import (
    Histogram,
)


def test_histogram_regrowth_is_exact() -> None:
    """Growing by doubling merges bins pairwise: the counts equal a histogram of all the data on
    the final range (integers on dyadic edges, so no value sits on a rounding boundary)."""
    hist = Histogram(16)
    batches = [
        torch.arange(0, 16, dtype=torch.float32),  # 15 * 16/15: range [0, 16)
        torch.tensor([40.0, 3.0, 16.0, 32.0]),  # grows up twice: [0, 64)
        torch.tensor([-50.0, 60.0, 0.0]),  # grows down once: [-64, 64]
    ]
    for b in batches:
        hist.add(b)
    assert (hist.lo, hist.width) == (-64.0, 128.0)
    data = torch.cat(batches).numpy()
    ref = np.histogram(data, bins=16, range=(-64, 64))[0]
    np.testing.assert_array_equal(hist.counts.numpy(), ref)
    assert hist.total == data.size and (hist.min_val, hist.max_val) == (-50.0, 60.0)
    assert hist.quantile(0.0) == -50.0 and hist.quantile(1.0) == 60.0
