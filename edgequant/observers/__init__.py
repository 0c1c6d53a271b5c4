"""Range estimators: watch tensors during calibration, then say which range to quantize.

Each observer is an nn.Module with `forward(x)` (records statistics, returns nothing useful) and
`compute_range()` -> (min_val, max_val) shaped as `functional.param_shape` for its spec's
granularity. They are looked up by name in OBSERVERS.

Statistics that must survive many batches of different shapes (variable sequence length) are kept
in shape-free forms: per-tensor histograms that grow by doubling their range (so old bins merge
exactly, pairwise), and per-channel/per-group bounded samples of each row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from edgequant import functional as F

if TYPE_CHECKING:
    from edgequant.spec import QuantSpec
from edgequant.observers.base import EMAObserver, MinMaxObserver, Observer
from edgequant.observers.entropy import EntropyObserver
from edgequant.observers.sampled import MSEObserver, PercentileObserver
from edgequant.observers.stats import Histogram


class AutoObserver(Observer):
    """Per layer "auto": feeds every candidate observer and, at compute_range, picks the candidate
    range whose quantization causes the least error.

    The error is measured on a bounded sample of the observed tensor (its first `sample_items`
    items along dim 0). By default it is the tensor's own squared quantization error; calibration
    code that knows which layers read the tensor sets `score_fn(sample, fake_quantized_sample)`
    to measure the error in those layers' outputs instead (ptq.auto). `chosen` names the pick.
    """

    CANDIDATES: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")

    def __init__(self, spec: QuantSpec, sample_items: int = 32) -> None:
        super().__init__(spec)
        names = [c for c in self.CANDIDATES if spec.per_tensor or c != "entropy"]
        self.candidates = nn.ModuleDict({c: OBSERVERS[c](spec) for c in names})
        self.sample_items = int(sample_items)
        self.samples: list[Tensor] = []
        self._kept = 0
        self.score_fn: Callable[[Tensor, Tensor], float] | None = None
        self.chosen: str | None = None
        self.errors: dict[str, float] = {}

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        x = self._check_batch(x)
        for obs in self.candidates.values():
            obs(x)
        if self._kept < self.sample_items and x.dim() > 0:
            part = x[: self.sample_items - self._kept].clone()
            self.samples.append(part)
            self._kept += part.shape[0]
        self.batches += 1

    def _fake_quantize(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        spec = self.spec
        scale, zp = F.calc_qparams(
            lo, hi, spec.qmin, spec.qmax, spec.symmetric, pow2=spec.scale_type == "pow2"
        )
        return F.fake_quantize(x, scale, zp, spec.qmin, spec.qmax, self.axis, self.group_size)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self._need_data()
        best: tuple[float, str, Tensor, Tensor] | None = None
        self.errors = {}
        for name, obs in self.candidates.items():
            lo, hi = cast(Observer, obs).compute_range()
            errs = []
            for x in self.samples:
                xq = self._fake_quantize(x, lo, hi)
                if self.score_fn is not None:
                    errs.append(float(self.score_fn(x, xq)))
                else:
                    errs.append(float((xq - x).double().square().mean()))
            err = sum(errs) / max(len(errs), 1)
            self.errors[name] = err
            if best is None or err < best[0]:
                best = (err, name, lo, hi)
        assert best is not None
        self.chosen = best[1]
        return best[2], best[3]


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
    "auto": AutoObserver,
}


__all__ = [
    "OBSERVERS",
    "AutoObserver",
    "EMAObserver",
    "EntropyObserver",
    "Histogram",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
]
