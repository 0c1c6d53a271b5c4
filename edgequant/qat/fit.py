"""eq.fit_qat: a QAT training loop for users who do not bring their own.

Adam (default) or SGD, a cosine learning rate over all steps (qat/optim.py), distillation from
an FP32 teacher (qat/distill.py), a tqdm progress bar, an atomic checkpoint after every epoch
and resume= to continue an interrupted run to bit-identical weights (same data order: the
random generators are saved with the model, optimizer and schedule), and the choice of the
epoch kept (qat/selection.py): the prepared start unless an epoch beats it on held-out data by
more than noise, so QAT never leaves a model worse than where it started. The settings are a
FitConfig (qat/config.py).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgequant.batches import batch_size, call_model, metric_number, nonfinite
from edgequant.metrics import logits_of
from edgequant.ptq.calibrate import check_context
from edgequant.qat import checkpoint as ckpt
from edgequant.qat.causal_lm import check_token_batches, is_causal_lm, split_tokens, token_rows
from edgequant.qat.config import FitConfig
from edgequant.qat.distill import FeatureMatch, distillation_loss, feature_layer_names
from edgequant.qat.optim import Schedule, WeightAverage, build_optimizer, steps_per_epoch
from edgequant.qat.oscillation import dampen_ramp, dampening_loss
from edgequant.qat.prepare import freeze_observers, qat_quantizers
from edgequant.qat.selection import EpochChooser, heldout_source

# An epoch whose mean training loss exceeds this many times the loss of the run's first step,
# plus 1, has diverged (select="best" then stops the run and keeps the best epoch so far).
DIVERGED_FACTOR = 10.0


class NaNLossError(FloatingPointError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class _Diverged(Exception):
    """The run stopped because its loss became non-finite or grew without bound (select="best")."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_call(
    qmodel: Any,
    train_data: Any,
    cfg: FitConfig,
    teacher: Any,
    val_fn: Any,
    val_data: Any,
    on_epoch_end: Any,
) -> nn.Module:
    """The unwrapped model, once every argument that is not a setting is checked."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    model = _unwrap(qmodel)
    if not qat_quantizers(model):
        raise ValueError("qmodel has no QAT quantizers: prepare it with eq.prepare_qat first")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
    if cfg.feature_weight > 0 and teacher is None:
        raise ValueError("feature_weight > 0 distils the teacher's features: pass teacher=")
    for label, fn in (("val_fn", val_fn), ("on_epoch_end", on_epoch_end)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{label} must be callable or None, got {type(fn).__name__} {fn!r}")
    if isinstance(train_data, (Tensor, dict, Iterator)) or not isinstance(train_data, Iterable):
        raise TypeError(
            "train_data must be re-iterable (a DataLoader or a list of batches): it is read "
            f"once per epoch; got {type(train_data).__name__}"
        )
    if val_data is not None and (
        isinstance(val_data, (Tensor, dict)) or not isinstance(val_data, Iterable)
    ):
        raise TypeError(
            "val_data must be an iterable of held-out batches (inputs or (inputs, labels)), got "
            f"{type(val_data).__name__}"
        )
    if val_data is not None and (cfg.select != "best" or val_fn is not None):
        raise ValueError(
            "val_data chooses the epoch kept: it needs select='best' and no val_fn (which "
            "would choose instead)"
        )
    return model


def _split(batch: Any, index: int, causal_lm: bool = False) -> tuple[Any, Tensor | None]:
    """(inputs, labels or None) of one training item: a tensor, or an (inputs, labels) pair;
    for a causal LM, token ids (causal_lm.split_tokens)."""
    if causal_lm:
        return split_tokens(batch, index)
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor):
        x, y = batch
        if isinstance(y, Tensor) and not y.is_floating_point():
            return x, y
    if isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], Tensor):
        return batch[0], None
    raise TypeError(
        f"train_data item {index}: expected a tensor of inputs or an (inputs, integer labels) "
        f"pair, got {type(batch).__name__}"
    )


def _check_labels(labels: Tensor, logits: Tensor, index: int) -> None:
    """Class indices in [0, classes) for the model's logits; torch's own error names neither the
    item nor the value."""
    classes = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(
            f"train_data item {index} has label {bad}, but the model has {classes} outputs: "
            f"labels must be class indices in [0, {classes - 1}]"
        )


class _Run:
    """One fit_qat run's moving parts: the model, the optimizer and its schedule, the weight
    average, the feature matcher, the checkpoint and the history."""

    def __init__(
        self,
        qmodel: nn.Module,
        model: nn.Module,
        cfg: FitConfig,
        train_data: Iterable[Any],
        teacher: nn.Module | None,
        layers: Sequence[str],
        path: Path | None,
    ) -> None:
        self.qmodel, self.model, self.cfg = qmodel, model, cfg
        self.train_data, self.teacher, self.path = train_data, teacher, path
        self.opt, self.trained = build_optimizer(model, cfg)
        self.schedule = Schedule(self.opt, cfg, steps_per_epoch(train_data))
        self.average = (
            WeightAverage(self.trained, cfg.weight_average) if cfg.weight_average > 0 else None
        )
        self.match = (
            FeatureMatch(model, teacher, layers) if teacher is not None and layers else None
        )
        self.causal_lm = is_causal_lm(model)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.ref_loss: float | None = None
        self.bar: Any = None

    def resume(self, was_there: bool, chooser: EpochChooser | None) -> bool:
        """Load the checkpoint where resume=True finds one; whether the choice of the epoch kept
        was resumed too."""
        path = self.path
        if not self.cfg.resume or path is None:
            return False
        if not path.is_file():
            # The first run of a script that always passes resume=True lands here; so does a
            # mistyped folder, which would throw away the run it meant to continue: say which.
            warnings.warn(
                f"resume=True: no checkpoint {path.name} in {path.parent}"
                f"{'' if was_there else ' (no such folder)'}; training starts from epoch 1",
                stacklevel=3,
            )
            return False
        state = ckpt.load(path, self.model)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        raw = state.get("raw_parameters")
        if (raw is None) != (self.average is None):
            raise ValueError(
                f"the checkpoint {path} was made with weight_average "
                f"{'0' if raw is None else '> 0'}; this run has weight_average="
                f"{self.cfg.weight_average}: resume with the same setting"
            )
        if self.average is not None and raw is not None and self.start_epoch < self.cfg.epochs:
            self.average.resume(raw)
        if chooser is not None and "selection" in state:
            chooser.load(state["selection"])
            self.ref_loss = state["selection"].get("ref_loss")
            return True
        return False

    def step(self, epoch: int, index: int, batch: Any, choose: bool) -> tuple[float, int]:
        """One optimizer step on one batch: (its loss, its number of samples)."""
        x, y = _split(batch, index, self.causal_lm)
        if self.causal_lm:
            check_context(self.model, x, f"train_data item {index}")
        if count := nonfinite(x):
            # Fake-quantize maps NaN inputs to grid points: the loss stays finite and the model
            # trains on garbage without a word.
            raise ValueError(
                f"train_data item {index} (epoch {epoch}) holds NaN or Inf in its inputs "
                f"({count} of {x.numel()} values)"
            )
        if y is None and self.teacher is None:
            raise ValueError(
                f"train_data item {index} has no labels and no teacher was given: pass "
                "(inputs, labels) pairs or teacher="
            )
        loss = self._loss(x, y, epoch, index)
        if not torch.isfinite(loss):
            self._non_finite(loss, epoch, index, choose)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.average is not None:
            self.average.update()
        self.schedule.after_step()
        value = float(loss.detach())
        if epoch == 1 and index == 0:
            self.ref_loss = value  # the start's loss, before any step
        return value, batch_size(x)

    def _loss(self, x: Tensor, y: Tensor | None, epoch: int, index: int) -> Tensor:
        cfg, match = self.cfg, self.match
        teacher_logits = None
        if match is not None:
            match.capturing = True
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self._logits(self.teacher, x)
        logits = self._logits(self.qmodel, x)
        if self.causal_lm:
            logits, teacher_logits = token_rows(x, logits, teacher_logits, index)
        if (
            isinstance(teacher_logits, Tensor)
            and isinstance(logits, Tensor)
            and teacher_logits.shape != logits.shape
        ):
            raise ValueError(
                f"teacher output has shape {tuple(teacher_logits.shape)} on train_data item "
                f"{index}, the model's {tuple(logits.shape)}: distillation compares them class "
                "by class; pass the FP32 model that qmodel was prepared from"
            )
        if y is not None:
            _check_labels(y, logits, index)
        loss = distillation_loss(logits, y, teacher_logits, cfg.temperature, cfg.kd_weight)
        if match is not None:
            match.capturing = False
            loss = loss + cfg.feature_weight * match.loss()
        if cfg.dampen_weight > 0:
            ramp = dampen_ramp(self.schedule.steps_done(epoch, index), self.schedule.total)
            loss = loss + cfg.dampen_weight * ramp * dampening_loss(self.model)
        return loss

    def _logits(self, model: nn.Module, x: Any) -> Any:
        """The model's output on x; a causal LM's logits (batch, tokens, vocabulary)."""
        if self.causal_lm:
            return logits_of(call_model(model, x))
        return model(x)

    def _non_finite(self, loss: Tensor, epoch: int, index: int, choose: bool) -> None:
        if choose:
            raise _Diverged(
                f"the QAT loss became {float(loss.detach())} at epoch {epoch}, step {index}"
            )
        path = self.path
        last = self.start_epoch if not self.history else self.history[-1]["epoch"]
        where = (
            f"the last good checkpoint ({path}, epoch {last}) is kept"
            if path is not None and path.is_file()
            else "no checkpoint was written yet"
        )
        raise NaNLossError(
            f"QAT loss is {float(loss.detach())} at epoch {epoch}, step {index}: training "
            f"stopped; {where}. Lower lr (now {self.schedule.last_lr():.3g}) or check the data."
        )

    def train_epoch(self, epoch: int, choose: bool) -> dict[str, Any]:
        """One pass over train_data; the epoch's record (mean loss, learning rate, wall time)."""
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.freeze_observers_epoch is not None and epoch >= cfg.freeze_observers_epoch:
            freeze_observers(self.model)
        self.qmodel.train()
        started = time.perf_counter()
        total, samples = 0.0, 0
        self.bar = tqdm(
            self.train_data,
            total=self.schedule.per_epoch or None,
            desc=f"QAT epoch {epoch}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        for index, batch in enumerate(self.bar):
            loss, n = self.step(epoch, index, batch, choose)
            total += loss * n
            samples += n
            self.bar.set_postfix(loss=f"{total / samples:.4f}")
        self.bar.close()
        self.schedule.after_epoch()
        if samples == 0:
            raise ValueError("train_data yielded no batches")
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": total / samples,
            "lr": self.schedule.last_lr(),
            "wall_s": time.perf_counter() - started,
        }
        if self.ref_loss is None:
            self.ref_loss = record["loss"]
        if choose and record["loss"] > DIVERGED_FACTOR * self.ref_loss + 1.0:
            self.history.append({**record, "diverged": True})
            raise _Diverged(
                f"the QAT loss grew from {self.ref_loss:.4g} (first step) to "
                f"{record['loss']:.4g} (epoch {epoch}'s mean), over {DIVERGED_FACTOR:g} times "
                "and 1 more"
            )
        return record

    def save(self, epoch: int, chooser: EpochChooser | None, raw: list[Tensor] | None) -> None:
        """The atomic checkpoint after `epoch` (rank 0 only)."""
        if self.path is None or not _is_rank0():
            return
        state: dict[str, Any] = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.schedule.sched.state_dict(),
            "rng": ckpt.rng_state(),
            "fingerprint": ckpt.fingerprint(self.model),
            "history": self.history,
        }
        if chooser is not None:
            state["selection"] = {**chooser.state(), "ref_loss": self.ref_loss}
        if raw is not None:
            state["raw_parameters"] = raw
        ckpt.save(self.path, state)

    def close(self, teacher_flags: dict[nn.Module, bool]) -> None:
        if self.bar is not None:  # an error mid-epoch: leave no half-drawn progress bar behind
            self.bar.close()
        if self.match is not None:
            self.match.remove()
        for m, flag in teacher_flags.items():
            m.training = flag


def _epochs(
    run: _Run,
    chooser: EpochChooser | None,
    val_fn: Callable[[nn.Module], float] | None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
) -> None:
    """Train the remaining epochs; after each, score, checkpoint and report it."""
    cfg, model = run.cfg, run.model
    for epoch in range(run.start_epoch + 1, cfg.epochs + 1):
        record = run.train_epoch(epoch, chooser is not None)
        raw = run.average.swap_in() if run.average is not None else None
        model.eval()
        if val_fn is not None:
            record["val"] = metric_number(
                val_fn(model), "val_fn", f"the model after epoch {epoch}", finite=False
            )
        if chooser is not None:
            chooser.score(epoch, model, record)
        run.history.append(record)
        run.save(epoch, chooser, raw)
        if cfg.progress:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
            print(f"QAT epoch {epoch}/{cfg.epochs}: {shown}", file=sys.stderr, flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if raw is not None and epoch < cfg.epochs:
            assert run.average is not None
            run.average.restore(raw)


def _chooser(
    model: nn.Module,
    train_data: Iterable[Any],
    cfg: FitConfig,
    teacher: nn.Module | None,
    val_fn: Callable[[nn.Module], float] | None,
    val_data: Iterable[Any] | None,
) -> tuple[Iterable[Any], EpochChooser | None]:
    """(the batches to train on, what chooses the epoch kept: None with select="last"); without
    val_fn the held-out part comes out of train_data unless val_data is given."""
    if cfg.select != "best":
        return train_data, None
    hits_of, against = None, ""
    if val_fn is None:
        train_data, hits_of, against = heldout_source(
            train_data, teacher, val_data, causal_lm=is_causal_lm(model)
        )
    return train_data, EpochChooser(val_fn, hits_of, against)


def fit_qat(
    qmodel: nn.Module,
    train_data: Iterable[Any],
    config: FitConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    val_data: Iterable[Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Train a prepared model (eq.prepare_qat) in place; return one record per epoch.

    train_data: re-iterable (a DataLoader, a list) of input tensors or (inputs, labels) pairs;
    without labels a teacher is required. config: a FitConfig (qat/config.py, its defaults
    when None); keyword `settings` change single fields of it (`fit_qat(q, data, epochs=10,
    teacher=model)`), an unknown name is refused.

    A causal LM (a Hugging Face model with an lm_head) trains on token ids: dict batches with
    "input_ids" (a tokenizer's output) or (batch, tokens) tensors, distilled from the teacher's
    logits at every position (KL of the next-token distributions, padding left out); its
    held-out score is each held-out sequence's next-token NLL (perplexity: lower is better), an
    epoch replacing the start only where the per-sequence decrease is more than two standard
    errors (loss_selection.select_epoch_by_loss).

    With select="best" (the default) the model is left holding the epoch that held-out data
    prefers, the start (epoch 0, the model as prepared) included: by val_fn where one is given
    (higher is better; the earliest epoch on a tie); else on `val_data`, or else on a held-out
    part of train_data (every 7th batch of a list, every 7th sample of a DataLoader), by
    per-sample top-1 hits against the labels (or the teacher's top-1), where an epoch replaces
    the start only if it wins by more than two standard errors (selection.select_epoch). A
    train_data that is neither a list nor a DataLoader over a dataset cannot be split: the last
    epoch is then kept, with a warning. A loss that becomes NaN/Inf, or an epoch whose mean
    loss exceeds DIVERGED_FACTOR times that of the first step plus 1, stops the run with the
    best epoch so far kept (a warning says so). The choice and its evidence go to
    qmodel.quant_info["qat_selection"] and the summary. With select="last" the last epoch is
    kept and a NaN loss raises NaNLossError.

    val_fn(model) -> float is called after each epoch (and, with select="best", once before the
    first), model in eval mode. on_epoch_end(epoch, record) runs after the checkpoint. The
    teacher runs in eval mode and its flags are put back at the end. The model is left in eval
    mode, its grids in the standard buffers (export it with eq.export_onnx).
    """
    if config is not None and not isinstance(config, FitConfig):
        raise TypeError(
            f"config must be a FitConfig or None, got {type(config).__name__} {config!r} (pass "
            "single settings by name: fit_qat(qmodel, data, epochs=10))"
        )
    cfg = (config if config is not None else FitConfig()).replace(**settings).resolved()
    model = _check_call(qmodel, train_data, cfg, teacher, val_fn, val_data, on_epoch_end)
    if is_causal_lm(model):
        check_token_batches(model, train_data)
    train_data, chooser = _chooser(model, train_data, cfg, teacher, val_fn, val_data)
    if cfg.dampen_weight > 0:
        dampening_loss(model)  # refuses a model with nothing to dampen, before any training
    layers = (
        feature_layer_names(model, teacher, cfg.feature_layers)
        if cfg.feature_weight > 0 and teacher is not None
        else []
    )
    path, was_there = ckpt.checkpoint_file(cfg.checkpoint_dir)
    torch.manual_seed(cfg.seed)
    run = _Run(qmodel, model, cfg, train_data, teacher, layers, path)
    if not run.resume(was_there, chooser) and chooser is not None:
        chooser.start(model)
    stopped = ""
    teacher_flags = {m: m.training for m in teacher.modules()} if teacher is not None else {}
    try:
        if teacher is not None:
            teacher.eval()
        _epochs(run, chooser, val_fn, on_epoch_end)
    except _Diverged as err:
        stopped = str(err)
    finally:
        run.close(teacher_flags)
    model.eval()
    if chooser is not None:
        chooser.keep(model, stopped)
    return run.history


__all__ = ["DIVERGED_FACTOR", "FitConfig", "NaNLossError", "fit_qat"]
