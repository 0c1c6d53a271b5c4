"""Which QAT epoch to keep: held-out data, per-sample hits, and a rule that keeps the start.

QAT fine-tunes a PTQ model; an epoch replaces that start only when it wins on samples that
training never saw by more than noise (McNemar's paired comparison of per-sample top-1 hits),
so a QAT run is never worse than its PTQ start by a difference the held-out data can tell.
A causal LM is scored on its held-out text instead (loss_selection.py).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from edgequant.batches import call_model, in_eval_mode, metric_number, nonfinite
from edgequant.qat.loss_selection import (
    NEXT_TOKENS,
    SELECTION_Z,
    heldout_nll,
    select_epoch_by_loss,
)

# Every HOLDOUT_EVERY-th batch of train_data is held out of training to score each epoch; an
# epoch replaces the start only when it wins by more than SELECTION_Z standard errors
# (loss_selection.py, where the causal LM's rule on held-out losses is).
HOLDOUT_EVERY = 7


def holdout_split(train: Sequence[Any], every: int = HOLDOUT_EVERY) -> tuple[list[Any], list[Any]]:
    """(batches to train on, held-out batches): every `every`-th batch is held out (strided, so
    a train_data sorted by class still gives a mixed slice); with fewer batches than `every`,
    the last one. Needs at least 2 batches."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 2:
        raise ValueError(f"every must be an int >= 2 (1 would hold out everything), got {every!r}")
    if len(train) < 2:
        raise ValueError(
            f"a QAT run needs at least 2 batches of train_data (one is held out to choose the "
            f"epoch kept), got {len(train)}"
        )
    step = min(every, len(train))
    held = set(range(step - 1, len(train), step))
    return [b for i, b in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def split_labels(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(inputs, integer labels or None) of one item: an (inputs, labels) pair or inputs alone."""
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[1], torch.Tensor)
        and not batch[1].is_floating_point()
    ):
        return batch[0], batch[1]
    return batch, None


def heldout_hits(
    teacher: nn.Module | None, held: Iterable[Any]
) -> tuple[Callable[[nn.Module], torch.Tensor], str]:
    """(model -> per-sample top-1 hits on the held-out batches, what the hits are against): the
    labels where every batch has them, else the teacher's top-1 (agreement with FP32)."""
    pairs = [split_labels(batch) for batch in held]
    has_labels = all(y is not None for _, y in pairs)
    if not has_labels and teacher is None:
        raise ValueError(
            "the held-out batches have no labels and no teacher was given to agree with: pass "
            "(inputs, labels) pairs or teacher="
        )
    inputs: list[Any] = []
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for index, (x, y) in enumerate(pairs):
            if isinstance(x, torch.Tensor) and (count := nonfinite(x)):
                raise ValueError(
                    f"held-out batch {index} holds NaN or Inf in its inputs ({count} of "
                    f"{x.numel()} values)"
                )
            inputs.append(x)
            if y is not None:
                targets.append(y)
            else:
                assert teacher is not None
                targets.append(call_model(teacher, x).argmax(-1))

    def hits(model: nn.Module) -> torch.Tensor:
        found = []
        with in_eval_mode(model), torch.no_grad():
            for index, (x, t) in enumerate(zip(inputs, targets, strict=True)):
                out = call_model(model, x)
                classes = out.shape[-1]
                if has_labels and t.numel() and (int(t.min()) < 0 or int(t.max()) >= classes):
                    bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
                    raise ValueError(
                        f"held-out batch {index} has label {bad}, but the model has "
                        f"{classes} outputs: labels must be class indices in [0, {classes - 1}]"
                    )
                found.append((out.argmax(-1) == t).flatten())
        return torch.cat(found)

    return hits, "labels" if has_labels else "FP32 top-1"


def select_epoch(hits: Sequence[torch.Tensor], z: float = SELECTION_Z) -> tuple[int, str]:
    """(epoch to keep, why) from per-sample hits on held-out data, hits[0] being the start.

    The candidate is the epoch with the most hits, the latest on a tie (under a cosine schedule
    a later epoch has settled at a lower rate; the rule below guards the start). It replaces the
    start only if, of the samples on which the two disagree, it gets b right that the start gets
    wrong and c the other way with b - c > z * sqrt(b + c): a gain of more than z standard
    errors of the paired difference (McNemar's statistic). Otherwise QAT keeps the start, so it
    is never worse than PTQ by a difference that the held-out data cannot tell from noise.
    """
    if not hits:
        raise ValueError("hits is empty: it needs at least the PTQ start's hits (epoch 0)")
    for epoch, h in enumerate(hits):
        if not isinstance(h, torch.Tensor) or h.dtype != torch.bool or h.shape != hits[0].shape:
            raise ValueError(
                f"hits[{epoch}] must be a bool tensor shaped like hits[0] "
                f"{tuple(hits[0].shape) if isinstance(hits[0], torch.Tensor) else ''}, got "
                f"{h.dtype if isinstance(h, torch.Tensor) else type(h).__name__}"
                f"{tuple(h.shape) if isinstance(h, torch.Tensor) else ''}"
            )
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z >= 0:
        raise ValueError(f"z must be a number >= 0, got {z!r}")
    n = int(hits[0].numel())
    if len(hits) < 2:
        return 0, "no QAT epoch ran: the PTQ start is kept"
    counts = [int(h.sum()) for h in hits]
    best = max(range(1, len(hits)), key=lambda e: (counts[e], e))
    b = int((hits[best] & ~hits[0]).sum())
    c = int((~hits[best] & hits[0]).sum())
    margin = z * (b + c) ** 0.5
    scores = ", ".join(f"epoch {e}: {k}" for e, k in enumerate(counts))
    detail = (
        f"held-out hits of {n} ({scores}); the best epoch, {best}, gets {b} right that the PTQ "
        f"start gets wrong and {c} the other way"
    )
    if b - c > margin:
        return (
            best,
            f"kept epoch {best}: {detail}, a gain above {z:g} standard errors ({margin:.1f})",
        )
    if b == c == 0:
        return 0, f"kept the PTQ start (epoch 0): {detail}: no epoch changed a held-out answer"
    if b <= c:
        return 0, f"kept the PTQ start (epoch 0): {detail}: no epoch gained on it"
    return 0, (
        f"kept the PTQ start (epoch 0): {detail}; a gain of {b - c} is within {z:g} standard "
        f"errors ({margin:.1f}), not distinguishable from noise"
    )


def select_by_value(values: Sequence[float]) -> tuple[int, str]:
    """(epoch to keep, why) from one score per epoch (higher is better, values[0] the start),
    as a user's val_fn returns them: the best epoch, the earliest on a tie, the start included.
    NaN never wins."""
    finite = [(v, -e) for e, v in enumerate(values) if v == v]
    if not finite:
        return 0, "val_fn gave no number for any epoch: the PTQ start is kept"
    best = -max(finite)[1]
    shown = ", ".join(f"epoch {e}: {v:.4g}" for e, v in enumerate(values))
    if best == 0:
        return 0, f"kept the PTQ start (epoch 0): val_fn ({shown}): no epoch beat it"
    return best, f"kept epoch {best}: the best val_fn ({shown})"


# A DataLoader is split at the sample level; its held-out part is capped at this many samples.
MAX_HELDOUT_SAMPLES = 4096


def split_loader(loader: Any, every: int) -> tuple[Any, list[Any]] | None:
    """(a DataLoader over the samples kept for training, the held-out batches) for a DataLoader
    over a map-style dataset with a plain sequential or random sampler: every `every`-th sample
    is held out (at most MAX_HELDOUT_SAMPLES), the same ones every epoch. None for any other
    loader (its batches cannot be told apart from one epoch to the next)."""
    from torch.utils.data import (
        DataLoader,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
        Subset,
    )

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    if loader.batch_size is None or type(loader.sampler) not in (RandomSampler, SequentialSampler):
        return None
    n = len(loader.dataset)  # type: ignore[arg-type]
    held_idx = list(range(every - 1, n, every))[:MAX_HELDOUT_SAMPLES]
    if not held_idx or len(held_idx) == n:
        return None
    held_set = set(held_idx)
    fit = DataLoader(
        Subset(loader.dataset, [i for i in range(n) if i not in held_set]),
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        generator=loader.generator,
    )
    held = DataLoader(
        Subset(loader.dataset, held_idx), batch_size=loader.batch_size, collate_fn=loader.collate_fn
    )
    return fit, list(held)


def heldout_source(
    train_data: Iterable[Any],
    teacher: nn.Module | None,
    val_data: Iterable[Any] | None,
    causal_lm: bool = False,
) -> tuple[Iterable[Any], Callable[[nn.Module], torch.Tensor] | None, str]:
    """(the batches to train on, model -> held-out hits or None, what the hits are against):
    from val_data where given, else a held-out part of train_data (every HOLDOUT_EVERY-th batch
    of a list, every HOLDOUT_EVERY-th sample of a DataLoader). None, with a warning, for a
    train_data that cannot be split (its batches differ between epochs). causal_lm: the
    held-out score is each sequence's next-token NLL (heldout_nll), against "next tokens"."""
    held: list[Any] | None = None
    if val_data is not None:
        held = list(val_data)
        if not held:
            raise ValueError("val_data yielded no batches")
    elif isinstance(train_data, Sequence) and not isinstance(train_data, (str, bytes)):
        if len(train_data) >= 2:
            train_data, held = holdout_split(list(train_data), HOLDOUT_EVERY)
    else:
        split = split_loader(train_data, HOLDOUT_EVERY)
        if split is not None:
            train_data, held = split
    if held is None:
        warnings.warn(
            f"fit_qat(select='best'): train_data ({type(train_data).__name__}) is neither a "
            "list of batches nor a DataLoader over a dataset, so no held-out part can be "
            "split off it; the last epoch is kept. Pass val_data= (held-out batches) or "
            "val_fn= to keep the best epoch.",
            stacklevel=4,
        )
        return train_data, None, ""
    if causal_lm:
        return train_data, heldout_nll(held), NEXT_TOKENS
    hits_of, against = heldout_hits(teacher, held)
    return train_data, hits_of, against


class EpochChooser:
    """The epoch that fit_qat(select="best") keeps: each epoch's score (epoch 0 is the start),
    the start's state and the best trained epoch's so far, by val_fn (higher is better) or by
    held-out hits; `keep` loads the chosen one and records why."""

    def __init__(
        self,
        val_fn: Callable[[nn.Module], float] | None,
        hits_of: Callable[[nn.Module], torch.Tensor] | None,
        against: str,
    ) -> None:
        self.val_fn = val_fn
        self.hits_of = hits_of
        self.against = against
        self.scores: list[float] = []
        self.hits: list[torch.Tensor] = []
        self.start_state: dict[str, Any] | None = None
        self.best: tuple[int, float, dict[str, Any]] | None = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores to resume the choice."""
        return {
            "scores": self.scores,
            "hits": self.hits,
            "start_state": self.start_state,
            "best": self.best,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.scores = list(state["scores"])
        self.hits = list(state["hits"])
        self.start_state = state["start_state"]
        self.best = state["best"]

    def start(self, model: nn.Module) -> None:
        """Keep and score the model as prepared (epoch 0)."""
        self.start_state = copy.deepcopy(model.state_dict())
        model.eval()
        if self.val_fn is not None:
            self.scores.append(
                metric_number(self.val_fn(model), "val_fn", "the model as prepared", finite=False)
            )
        elif self.hits_of is not None:
            self.hits.append(self.hits_of(model))

    def score(self, epoch: int, model: nn.Module, record: dict[str, Any]) -> None:
        """Score the model after `epoch` (record["val"] holds val_fn's value where there is
        one) and keep its state if it is the best epoch so far."""
        if self.val_fn is not None:
            value = float(record["val"])
            self.scores.append(value)
        elif self.hits_of is not None and self.against == NEXT_TOKENS:
            found = self.hits_of(model)
            self.hits.append(found)
            value = -float(found.double().mean())  # lower loss is better: its negative
            record["heldout_perplexity"] = math.exp(-value)
        elif self.hits_of is not None:
            found = self.hits_of(model)
            self.hits.append(found)
            value = float(found.sum())
            record["heldout_top1"] = value / max(found.numel(), 1)
        else:
            return
        # val_fn: the earliest best (select_by_value); held-out hits: the latest (select_epoch).
        better = self.best is None or value > self.best[1]
        tied = self.best is not None and value == self.best[1] and self.val_fn is None
        if value == value and (better or tied):
            self.best = (epoch, value, copy.deepcopy(model.state_dict()))

    def _decide(self, stopped: str) -> tuple[int, str, str, dict[str, Any]]:
        """(epoch kept (-1: the last), why, the rule, the evidence)."""
        if self.val_fn is not None:
            kept, why = select_by_value(self.scores)
            return (
                kept,
                why,
                "the highest val_fn, the start included (earliest on a tie)",
                {"val": list(self.scores)},
            )
        if self.hits_of is not None:
            count = int(self.hits[0].numel())
            if self.against == NEXT_TOKENS:
                kept, why = select_epoch_by_loss(self.hits)
                rule = (
                    "an epoch replaces the start only if the held-out per-sequence NLL falls by "
                    f"more than {SELECTION_Z:g} standard errors"
                )
                perplexity = [math.exp(float(h.double().mean())) for h in self.hits]
                evidence = {"held_out_sequences": count, "against": self.against}
                evidence["heldout_perplexity"] = perplexity
            else:
                kept, why = select_epoch(self.hits)
                rule = (
                    f"an epoch replaces the start only if b - c > {SELECTION_Z:g} * sqrt(b + c) "
                    "on held-out top-1 hits"
                )
                top1 = [float(h.float().mean()) for h in self.hits]
                evidence = {"held_out_predictions": count, "against": self.against}
                evidence["heldout_top1"] = top1
            return kept, why, rule, evidence
        if stopped:
            return 0, "no held-out data to choose on: the start is kept", "", {}
        return -1, "no held-out data to choose on: the last epoch is kept", "", {}

    def keep(self, model: nn.Module, stopped: str) -> None:
        """Load the epoch kept into `model` and record why in its quant_info and summary; warn
        where the run stopped on a diverging loss."""
        kept, why, rule, evidence = self._decide(stopped)
        if stopped:
            why = f"stopped: {stopped}; {why}"
            warnings.warn(f"fit_qat: {why}", stacklevel=3)
        if kept == 0:
            assert self.start_state is not None
            model.load_state_dict(self.start_state)
        elif kept > 0:
            assert self.best is not None and self.best[0] == kept, (kept, self.best)
            model.load_state_dict(self.best[2])
        model.eval()
        info = getattr(model, "quant_info", None)
        if isinstance(info, dict):
            info["qat_selection"] = {
                "kept_epoch": kept,
                "why": why,
                "rule": rule,
                **evidence,
                **({"stopped": stopped} if stopped else {}),
            }
        notes = getattr(getattr(model, "quant_summary", None), "notes", None)
        if isinstance(notes, list):
            notes.append(f"QAT epoch selection: {why}")


__all__ = [
    "HOLDOUT_EVERY",
    "MAX_HELDOUT_SAMPLES",
    "EpochChooser",
    "heldout_hits",
    "heldout_source",
    "holdout_split",
    "select_by_value",
    "select_epoch",
    "split_labels",
    "split_loader",
]
