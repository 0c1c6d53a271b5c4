"""eq.fit_qat: a QAT training loop for users who do not bring their own.

Adam (default) or SGD with momentum, a cosine learning rate over all steps, knowledge distillation from
an FP32 teacher (Hinton et al. 2015: KL divergence of temperature-softened logits, times T^2,
mixed with cross-entropy where labels are given), a tqdm progress bar, an atomic checkpoint
after every epoch, and resume= to continue an interrupted run to bit-identical weights (same
data order: the random generators are saved with the model, optimizer and schedule), and the
choice of the epoch kept (qat/selection.py): the prepared start unless an epoch beats it on
held-out data by more than noise, so QAT never leaves a model worse than where it started.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.instrument import metric_number, nonfinite
from edgequant.qat import checkpoint as ckpt
from edgequant.qat.base import QATQuantizer
from edgequant.qat.prepare import freeze_observers, qat_quantizers
from edgequant.qat.selection import (
    HOLDOUT_EVERY,
    SELECTION_Z,
    heldout_hits,
    holdout_split,
    select_by_value,
    select_epoch,
)

OPTIMIZERS = ("sgd", "adam")
# fit_qat(select=...): "best" keeps the held-out best epoch, the start included; "last" the last.
SELECTS = ("best", "last")
# An epoch whose mean training loss exceeds this many times the loss of the run's first step,
# plus 1, has diverged (select="best" then stops the run and keeps the best epoch so far).
DIVERGED_FACTOR = 10.0
# A DataLoader is split at the sample level; its held-out part is capped at this many samples.
MAX_HELDOUT_SAMPLES = 4096


class NaNLossError(FloatingPointError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class _Diverged(Exception):
    """The run stopped because its loss became non-finite or grew without bound (select="best")."""


def _split_loader(loader: Any, every: int) -> tuple[Any, list[Any]] | None:
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


def _split(batch: Any, index: int) -> tuple[Tensor, Tensor | None]:
    """(inputs, labels or None) of one training item: a tensor, or an (inputs, labels) pair."""
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


def distillation_loss(
    logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    temperature: float,
    kd_weight: float,
) -> Tensor:
    """CE on labels, KL to the teacher's softened logits (x T^2), or their mix."""
    if teacher_logits is None:
        assert labels is not None
        return torch_F.cross_entropy(logits, labels)
    t = temperature
    kd = torch_F.kl_div(
        torch_F.log_softmax(logits / t, dim=-1),
        torch_F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if labels is None:
        return kd
    return kd_weight * kd + (1.0 - kd_weight) * torch_F.cross_entropy(logits, labels)


class FeatureMatch:
    """The inputs of named layers in the student and the teacher, caught by forward pre-hooks
    while `capturing`, and their mismatch: per layer the mean squared difference over the
    teacher's mean square (so every layer counts alike whatever its scale), averaged over the
    layers. A layer called several times per forward is matched call by call."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self.capturing = False
        self.caught: dict[tuple[str, str], list[Tensor]] = {}
        self.handles: list[Any] = []
        for side, root in (("student", student), ("teacher", teacher)):
            modules = dict(root.named_modules())
            for name in self.names:
                self.handles.append(modules[name].register_forward_pre_hook(self._hook(side, name)))

    def _hook(self, side: str, name: str) -> Callable[..., None]:
        def catch(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.capturing and args and isinstance(args[0], Tensor):
                self.caught.setdefault((side, name), []).append(args[0])

        return catch

    def loss(self) -> Tensor:
        terms = []
        for name in self.names:
            student = self.caught.get(("student", name), [])
            teacher = self.caught.get(("teacher", name), [])
            if len(student) != len(teacher) or not student:
                raise RuntimeError(
                    f"feature distillation: layer {name!r} ran {len(student)} time(s) in the "
                    f"student and {len(teacher)} in the teacher in one step; name layers that "
                    "both models run, once per forward or the same number of times"
                )
            for s, t in zip(student, teacher, strict=True):
                if s.shape != t.shape:
                    raise RuntimeError(
                        f"feature distillation: layer {name!r} gets inputs of shape "
                        f"{tuple(s.shape)} in the student and {tuple(t.shape)} in the teacher"
                    )
                t = t.detach().float()
                terms.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        self.caught.clear()
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def dampening_loss(model: nn.Module) -> Tensor:
    """Oscillation dampening (Nagel et al. 2022, "Overcoming oscillations in quantization-aware
    training"): for every trained weight behind a QAT weight quantizer, the squared distance of
    the latent weight, clipped to the grid's range, from the grid point it rounds to, in grid
    steps, averaged over all those weights (so it lies in [0, 0.25] whatever the model's size and
    scales). The grid point and the steps are held fixed (no gradient): the term pulls each
    latent weight towards the centre of its bin, away from the rounding boundary where the STE
    keeps flipping it between two grid points, and leaves range learning alone. Being a mean,
    it pulls each of N weights with 2 d / (s^2 N) (d its distance from its grid point, s the
    step): the value stays comparable across models, the pull per weight does not. On ResNet-20
    (270k weights, 2.5 bits) the term held the weights on their grid points only from a weight
    of about 1,000."""
    total: Tensor | None = None
    count = 0
    for module in model.modules():
        q = getattr(module, "weight_quantizer", None)
        w = getattr(module, "weight", None)
        if not isinstance(q, QATQuantizer) or not isinstance(w, nn.Parameter):
            continue
        if not w.requires_grad or q.mode != "quantize":
            continue
        with torch.no_grad():
            scale, zp = q.qparams()
            s = F._broadcast(scale.detach().float(), w, q.axis, q.spec.group_size)
            z = F._broadcast(zp.detach().float(), w, q.axis, q.spec.group_size)
            grid = torch.clamp(torch.round(w / s + z), q.spec.qmin, q.spec.qmax) - z
            low, high = (q.spec.qmin - z) * s, (q.spec.qmax - z) * s
        steps = torch.minimum(torch.maximum(w, low), high) / s - grid
        term = steps.float().pow(2).sum()
        total = term if total is None else total + term
        count += w.numel()
    if total is None:
        raise ValueError(
            "dampen_weight > 0, but the model has no trained weight behind a QAT weight "
            "quantizer to dampen (are its weights quantized, and do they require grad?)"
        )
    return total / count


def feature_layer_names(
    model: nn.Module, teacher: nn.Module, names: Sequence[str] | None
) -> list[str]:
    """The layers whose inputs feature distillation matches: `names` (each checked to be a
    module of both models), or by default every quantized layer (a module with an input
    quantizer) that the teacher has under the same name."""
    student_modules = dict(model.named_modules())
    teacher_modules = dict(teacher.named_modules())
    if names is None:
        chosen = [
            name
            for name, module in student_modules.items()
            if isinstance(getattr(module, "input_quantizer", None), QATQuantizer)
            and name in teacher_modules
        ]
        if not chosen:
            raise ValueError(
                "feature distillation: the teacher has none of the quantized layers' names "
                "(is it the FP32 model the QAT model was prepared from?); pass feature_layers="
            )
        return chosen
    if isinstance(names, str) or not names:
        raise ValueError(f"feature_layers must be a non-empty list of layer names, got {names!r}")
    for name in names:
        for side, modules in (("qmodel", student_modules), ("teacher", teacher_modules)):
            if not isinstance(name, str) or not name or name not in modules:
                raise ValueError(f"feature_layers: {name!r} is not a layer of the {side}")
    return list(names)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _is_number_in(value: Any, low: float, high: float, low_open: bool = False) -> bool:
    """A real number (not a bool) in [low, high), or (low, high) with low_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (value > low if low_open else value >= low) and value < high


def fit_qat(
    qmodel: nn.Module,
    train_data: Iterable[Any],
    epochs: int = 3,
    lr: float = 1e-4,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    kd_weight: float = 1.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    val_fn: Callable[[nn.Module], float] | None = None,
    freeze_observers_epoch: int | None = None,
    range_lr_scale: float = 1.0,
    warmup_epochs: float = 0.0,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    progress: bool = True,
    seed: int = 0,
    weight_average: float = 0.0,
    feature_weight: float = 0.0,
    feature_layers: Sequence[str] | None = None,
    dampen_weight: float = 0.0,
    select: str = "best",
    val_data: Iterable[Any] | None = None,
) -> list[dict[str, Any]]:
    """Train a prepared model (eq.prepare_qat) in place; return one record per epoch.

    train_data: re-iterable (a DataLoader, a list) of input tensors or (inputs, labels) pairs;
    without labels a teacher is required. kd_weight: the share of the distillation term when
    there are labels too. The defaults (Adam at lr 1e-4, no warmup, the ranges at the same
    rate) are the setting chosen on ResNet-20's held-out images (BENCHMARKS.md); SGD at lr 1e-3
    diverged there in the first epoch.

    select="best" (default): the model is left holding the epoch that held-out data prefers,
    the start (epoch 0, the model as prepared) included: by val_fn where one is given (higher
    is better; the best value, the earliest epoch on a tie); else on `val_data`, or else on a
    held-out part of train_data (every 7th batch of a list, every 7th sample of a DataLoader),
    by per-sample top-1 hits against the labels (or the teacher's top-1), where an epoch
    replaces the start only if it wins by more than two standard errors (selection.
    select_epoch). A train_data that is neither a list nor a DataLoader over a dataset cannot be
    split (its batches differ between epochs): the last epoch is then kept, with a warning. A
    loss that becomes NaN/Inf or an epoch whose mean loss exceeds DIVERGED_FACTOR times that
    of the first step, plus 1, stops the run with the best epoch so far kept (a warning says so). The
    choice and its evidence go to qmodel.quant_info["qat_selection"] and the summary.
    select="last": the last epoch is kept, and a NaN loss raises NaNLossError.
    val_fn(model) -> float is called after each epoch (and, with select="best", once before the
    first), model in eval mode.
    checkpoint_dir: `qat_last.pt` is written there atomically after each epoch; resume=True
    continues from it (refused if it comes from another recipe or model). range_lr_scale: the
    learning rate of the learned ranges (LSQ step sizes and offsets, PACT clips) is lr times this:
    with Adam, whose steps are about lr in size whatever the gradient, a step size of 0.01 moves
    by 1 % of itself per step at lr 1e-4, so ranges calibrated by PTQ want a smaller factor.
    The ranges get no weight decay. warmup_epochs: the learning rate rises linearly from 0 over
    this many epochs (fractions allowed where train_data has a length) before the cosine decay:
    Adam's first steps move every parameter by about lr whatever its gradient, which knocks a
    PTQ-initialized model off its grid before the moments settle. on_epoch_end(epoch,
    record) runs after the checkpoint. weight_average: the decay d of an exponential moving
    average of every trained parameter (weights, biases, learned ranges), updated after each
    step (avg = d * avg + (1 - d) * param, starting from the prepared model; 0 = off, 0.99
    averages about the last 100 steps). STE training keeps moving weights that sit near a
    rounding boundary from one grid point to the next (Nagel et al. 2022, "Overcoming
    oscillations in quantization-aware training"), so the model at any one step is a noisy
    draw; the average is not. With it, every epoch's val_fn, checkpoint and on_epoch_end see
    the averaged model, training goes on from the raw parameters, and the model is left
    holding the average. feature_weight: adds that many times a feature-distillation term
    (FeatureMatch): the inputs of `feature_layers` (default: every quantized layer the teacher
    has by name) in the student against the teacher's, as normalized squared error; needs a
    teacher. Logits alone carry ten numbers per image, so on a few thousand images that the
    teacher has memorized the student drifts from it between them; matching every layer's
    input, as block reconstruction does in PTQ (Li et al. 2021, BRECQ), ties each layer to the
    teacher's representation. dampen_weight: adds that many times the oscillation-dampening
    term (`dampening_loss`, Nagel et al. 2022: the mean squared distance of the latent weights
    from their grid points, in grid steps), its weight rising from 0 along a half cosine over
    the run as the learning rate falls, so that weights move freely early and settle in their
    bins late, instead of ending on whichever side of a rounding boundary the last step left
    them. The model is left in eval mode, its grids in the standard
    buffers (export it with eq.export_onnx).
    """
    from tqdm import tqdm

    model = _unwrap(qmodel)
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    if not qat_quantizers(model):
        raise ValueError("qmodel has no QAT quantizers: prepare it with eq.prepare_qat first")
    _check_positive_int("epochs", epochs)
    if not _is_number_in(lr, 0.0, math.inf, low_open=True):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
    if not _is_number_in(momentum, 0.0, 1.0):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not _is_number_in(weight_decay, 0.0, math.inf):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not _is_number_in(temperature, 0.0, math.inf, low_open=True):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not _is_number_in(range_lr_scale, 0.0, math.inf):
        raise ValueError(f"range_lr_scale must be a number >= 0, got {range_lr_scale!r}")
    if not _is_number_in(warmup_epochs, 0.0, epochs):
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup_epochs!r}")
    if not _is_number_in(weight_average, 0.0, 1.0):
        raise ValueError(f"weight_average must be a number in [0, 1), got {weight_average!r}")
    if not _is_number_in(feature_weight, 0.0, math.inf):
        raise ValueError(f"feature_weight must be a number >= 0, got {feature_weight!r}")
    if not _is_number_in(dampen_weight, 0.0, math.inf):
        raise ValueError(f"dampen_weight must be a finite number >= 0, got {dampen_weight!r}")
    if feature_weight > 0 and teacher is None:
        raise ValueError("feature_weight > 0 distils the teacher's features: pass teacher=")
    if feature_layers is not None and feature_weight == 0:
        raise ValueError("feature_layers is given but feature_weight is 0: set feature_weight > 0")
    if not _is_number_in(kd_weight, 0.0, math.nextafter(1.0, math.inf)):  # [0, 1]
        raise ValueError(f"kd_weight must be a number in [0, 1], got {kd_weight!r}")
    for label, fn in (("val_fn", val_fn), ("on_epoch_end", on_epoch_end)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{label} must be callable or None, got {type(fn).__name__} {fn!r}")
    if freeze_observers_epoch is not None:
        _check_positive_int("freeze_observers_epoch", freeze_observers_epoch)
    if isinstance(train_data, (Tensor, dict, Iterator)) or not isinstance(train_data, Iterable):
        raise TypeError(
            "train_data must be re-iterable (a DataLoader or a list of batches): it is read "
            f"once per epoch; got {type(train_data).__name__}"
        )
    if not isinstance(resume, bool):
        raise TypeError(
            f"resume must be True or False, got {type(resume).__name__} {resume!r}: the run resumes "
            f"from checkpoint_dir/{ckpt.FILENAME}, so pass checkpoint_dir=<folder> and resume=True"
        )
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if select not in SELECTS:
        raise ValueError(f"unknown select {select!r}; valid: {', '.join(SELECTS)}")
    if val_data is not None and (
        isinstance(val_data, (Tensor, dict)) or not isinstance(val_data, Iterable)
    ):
        raise TypeError(
            "val_data must be an iterable of held-out batches (inputs or (inputs, labels)), got "
            f"{type(val_data).__name__}"
        )
    if val_data is not None and (select != "best" or val_fn is not None):
        raise ValueError(
            "val_data chooses the epoch kept: it needs select='best' and no val_fn (which "
            "would choose instead)"
        )
    # Where the epoch kept is chosen: val_fn, val_data, or a held-out part of train_data.
    hits_of: Callable[[nn.Module], Tensor] | None = None
    against = ""
    if select == "best" and val_fn is None:
        held: list[Any] | None = None
        if val_data is not None:
            held = list(val_data)
            if not held:
                raise ValueError("val_data yielded no batches")
        elif isinstance(train_data, Sequence) and not isinstance(train_data, (str, bytes)):
            if len(train_data) >= 2:
                fit_list, held = holdout_split(list(train_data), HOLDOUT_EVERY)
                train_data = fit_list
        else:
            split = _split_loader(train_data, HOLDOUT_EVERY)
            if split is not None:
                train_data, held = split
        if held is None:
            warnings.warn(
                f"fit_qat(select='best'): train_data ({type(train_data).__name__}) is neither a "
                "list of batches nor a DataLoader over a dataset, so no held-out part can be "
                "split off it; the last epoch is kept. Pass val_data= (held-out batches) or "
                "val_fn= to keep the best epoch.",
                stacklevel=2,
            )
        else:
            hits_of, against = heldout_hits(teacher, held)
    if dampen_weight > 0:
        dampening_loss(model)  # refuses a model with nothing to dampen, before any training
    layers = (
        feature_layer_names(model, teacher, feature_layers)
        if feature_weight > 0 and teacher is not None
        else []
    )
    path: Path | None = None
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / ckpt.FILENAME
        for folder in (path.parent, *path.parent.parents):
            if folder.exists() and not folder.is_dir():
                raise ValueError(
                    f"checkpoint_dir={str(checkpoint_dir)!r}: {str(folder)!r} is a file, not a "
                    f"folder; {ckpt.FILENAME} is written inside checkpoint_dir"
                )
        folder_was_there = path.parent.is_dir()
        path.parent.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    ranges = {id(p) for q in qat_quantizers(model) for p in q.parameters() if p.requires_grad}
    trained = [p for p in qmodel.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in trained if id(p) not in ranges]},
        {
            "params": [p for p in trained if id(p) in ranges],
            "lr": lr * range_lr_scale,
            "weight_decay": 0.0,
        },
    ]
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    try:
        steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = 0  # unknown: the cosine steps once per epoch
    per_step = steps_per_epoch > 0
    total_steps = epochs * steps_per_epoch if per_step else epochs
    warm = round(warmup_epochs * steps_per_epoch) if per_step else math.ceil(warmup_epochs)

    def factor(step: int) -> float:
        """Linear warmup to lr over `warm` steps, then cosine to 0 at `total_steps`."""
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total_steps - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def dampen_factor(epoch: int, index: int) -> float:
        """Near 0 at the first step, rising along a half cosine to 1 at the last (stepping once
        per epoch where train_data has no length)."""
        done = (epoch - 1) * steps_per_epoch + index + 1 if per_step else epoch
        return 0.5 * (1.0 - math.cos(math.pi * min(done / max(total_steps, 1), 1.0)))

    # The moving average of the trained parameters (weight_average > 0), in `trained` order.
    average = [p.detach().clone() for p in trained] if weight_average > 0 else None

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and path is not None and not path.is_file():
        # The first run of a script that always passes resume=True lands here; so does a
        # mistyped folder, which would throw away the run it meant to continue: say which.
        warnings.warn(
            f"resume=True: no checkpoint {path.name} in {path.parent}"
            f"{'' if folder_was_there else ' (no such folder)'}; training starts from "
            "epoch 1",
            stacklevel=2,
        )
    if resume and path is not None and path.is_file():
        state = ckpt.load(path, model)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        start_epoch = int(state["epoch"])
        history = list(state.get("history", []))
        raw = state.get("raw_parameters")
        if (raw is None) != (average is None):
            raise ValueError(
                f"the checkpoint {path} was made with weight_average "
                f"{'0' if raw is None else '> 0'}; this run has weight_average={weight_average}: "
                "resume with the same setting"
            )
        if average is not None and raw is not None and start_epoch < epochs:
            # The checkpoint's model holds the average; training goes on from the raw values.
            with torch.no_grad():
                for avg, p, value in zip(average, trained, raw, strict=True):
                    avg.copy_(p)
                    p.copy_(value)

    # The epoch kept (select="best"): each epoch's score (0 = the start), the start's state and
    # the best trained epoch's so far; the loss of the first step, which divergence is judged by.
    choose = select == "best"
    sel: dict[str, Any] = {
        "scores": [],
        "hits": [],
        "start_state": None,
        "best": None,
        "ref_loss": None,
    }
    if resume and path is not None and path.is_file() and "selection" in state:
        sel = state["selection"]
    elif choose:
        sel["start_state"] = copy.deepcopy(model.state_dict())
        model.eval()
        if val_fn is not None:
            sel["scores"].append(
                metric_number(val_fn(model), "val_fn", "the model as prepared", finite=False)
            )
        elif hits_of is not None:
            sel["hits"].append(hits_of(model))
    stopped = ""

    def score(epoch: int, record: dict[str, Any]) -> None:
        """Score the model after `epoch` and keep its state if it is the best epoch so far."""
        if val_fn is not None:
            value = float(record["val"])
            sel["scores"].append(value)
        elif hits_of is not None:
            found = hits_of(model)
            sel["hits"].append(found)
            value = float(found.sum())
            record["heldout_top1"] = value / max(found.numel(), 1)
        else:
            return
        if value == value and (sel["best"] is None or value > sel["best"][1]):
            sel["best"] = (epoch, value, copy.deepcopy(model.state_dict()))

    # Catches the layers' inputs in both models during training steps only (not in val_fn).
    match = FeatureMatch(model, teacher, layers) if teacher is not None and layers else None
    bar: Any = None
    # The teacher runs in eval mode; its flags are put back at the end (it is the caller's model).
    teacher_flags = {m: m.training for m in teacher.modules()} if teacher is not None else {}
    try:
        if teacher is not None:
            teacher.eval()
        for epoch in range(start_epoch + 1, epochs + 1):
            if freeze_observers_epoch is not None and epoch >= freeze_observers_epoch:
                freeze_observers(model)
            qmodel.train()
            started = time.perf_counter()
            total, samples = 0.0, 0
            bar = tqdm(
                train_data,
                total=steps_per_epoch or None,
                desc=f"QAT epoch {epoch}/{epochs}",
                disable=not progress,
                leave=False,
            )
            for index, batch in enumerate(bar):
                x, y = _split(batch, index)
                if count := nonfinite(x):
                    # Fake-quantize maps NaN inputs to grid points: the loss stays finite and the
                    # model trains on garbage without a word.
                    raise ValueError(
                        f"train_data item {index} (epoch {epoch}) holds NaN or Inf in its inputs "
                        f"({count} of {x.numel()} values)"
                    )
                if y is None and teacher is None:
                    raise ValueError(
                        f"train_data item {index} has no labels and no teacher was given: pass "
                        "(inputs, labels) pairs or teacher="
                    )
                teacher_logits = None
                if match is not None:
                    match.capturing = True
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                logits = qmodel(x)
                if (
                    isinstance(teacher_logits, Tensor)
                    and isinstance(logits, Tensor)
                    and teacher_logits.shape != logits.shape
                ):
                    raise ValueError(
                        f"teacher output has shape {tuple(teacher_logits.shape)} on train_data "
                        f"item {index}, the model's {tuple(logits.shape)}: distillation compares "
                        "them class by class; pass the FP32 model that qmodel was prepared from"
                    )
                if y is not None:
                    _check_labels(y, logits, index)
                loss = distillation_loss(logits, y, teacher_logits, temperature, kd_weight)
                if match is not None:
                    match.capturing = False
                    loss = loss + feature_weight * match.loss()
                if dampen_weight > 0:
                    loss = loss + dampen_weight * dampen_factor(epoch, index) * dampening_loss(
                        model
                    )
                if not torch.isfinite(loss) and choose:
                    raise _Diverged(
                        f"the QAT loss became {float(loss.detach())} at epoch {epoch}, step {index}"
                    )
                if not torch.isfinite(loss):
                    where = (
                        f"the last good checkpoint ({path}, epoch {start_epoch if not history else history[-1]['epoch']}) is kept"
                        if path is not None and path.is_file()
                        else "no checkpoint was written yet"
                    )
                    raise NaNLossError(
                        f"QAT loss is {float(loss.detach())} at epoch {epoch}, step {index}: training stopped; "
                        f"{where}. Lower lr (now {sched.get_last_lr()[0]:.3g}) or check the data."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if average is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(
                            average, [p.detach() for p in trained], 1.0 - weight_average
                        )
                if per_step:
                    sched.step()
                n = int(x.shape[0])
                total += float(loss.detach()) * n
                samples += n
                if epoch == 1 and index == 0:
                    sel["ref_loss"] = float(loss.detach())  # the start's loss, before any step
                bar.set_postfix(loss=f"{total / samples:.4f}")
            bar.close()
            if not per_step:
                sched.step()
            if samples == 0:
                raise ValueError("train_data yielded no batches")
            record: dict[str, Any] = {
                "epoch": epoch,
                "loss": total / samples,
                "lr": sched.get_last_lr()[0],
                "wall_s": time.perf_counter() - started,
            }
            if sel["ref_loss"] is None:
                sel["ref_loss"] = record["loss"]
            ref = sel["ref_loss"]
            if choose and record["loss"] > DIVERGED_FACTOR * ref + 1.0:
                history.append({**record, "diverged": True})
                raise _Diverged(
                    f"the QAT loss grew from {ref:.4g} (first step) to {record['loss']:.4g} "
                    f"(epoch {epoch}'s mean), over {DIVERGED_FACTOR:g} times and 1 more"
                )
            raw_values = None
            if average is not None:
                raw_values = [p.detach().clone() for p in trained]
                with torch.no_grad():
                    torch._foreach_copy_([p.detach() for p in trained], average)
            model.eval()
            if val_fn is not None:
                record["val"] = metric_number(
                    val_fn(model), "val_fn", f"the model after epoch {epoch}", finite=False
                )
            if choose:
                score(epoch, record)
            history.append(record)
            if path is not None and _is_rank0():
                ckpt.save(
                    path,
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "rng": ckpt.rng_state(),
                        "fingerprint": ckpt.fingerprint(model),
                        "history": history,
                        **({"selection": sel} if choose else {}),
                        **({"raw_parameters": raw_values} if raw_values is not None else {}),
                    },
                )
            if progress:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
                print(f"QAT epoch {epoch}/{epochs}: {shown}", file=sys.stderr, flush=True)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
            if raw_values is not None and epoch < epochs:
                with torch.no_grad():
                    torch._foreach_copy_([p.detach() for p in trained], raw_values)
    except _Diverged as err:
        stopped = str(err)
    finally:
        if bar is not None:  # an error mid-epoch: leave no half-drawn progress bar behind
            bar.close()
        if match is not None:
            match.remove()
        for m, flag in teacher_flags.items():
            m.training = flag
    model.eval()
    if choose:
        _keep_selected(model, sel, stopped, val_fn is not None, hits_of is not None, against)
    return history


def _keep_selected(
    model: nn.Module,
    sel: dict[str, Any],
    stopped: str,
    by_val_fn: bool,
    by_hits: bool,
    against: str,
) -> None:
    """Load the epoch that select="best" keeps into `model` and record why in its quant_info
    (and summary); warn where the run stopped on a diverging loss."""
    last = sel["best"][0] if sel["best"] is not None else 0
    rule = ""
    if by_val_fn:
        kept, why = select_by_value(sel["scores"])
        rule = "the highest val_fn, the start included (earliest on a tie)"
        evidence: dict[str, Any] = {"val": list(sel["scores"])}
    elif by_hits:
        kept, why = select_epoch(sel["hits"])
        rule = (
            f"an epoch replaces the start only if b - c > {SELECTION_Z:g} * sqrt(b + c) on "
            "held-out top-1 hits"
        )
        evidence = {
            "held_out_predictions": int(sel["hits"][0].numel()),
            "against": against,
            "heldout_top1": [float(h.float().mean()) for h in sel["hits"]],
        }
    elif stopped:
        kept, why, evidence = 0, "no held-out data to choose on: the start is kept", {}
    else:
        kept, why, evidence = -1, "no held-out data to choose on: the last epoch is kept", {}
    if stopped:
        why = f"stopped: {stopped}; {why}"
        warnings.warn(f"fit_qat: {why}", stacklevel=3)
    if kept == 0:
        model.load_state_dict(sel["start_state"])
    elif kept > 0:
        assert sel["best"] is not None and sel["best"][0] == kept, (kept, last)
        model.load_state_dict(sel["best"][2])
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
    summary = getattr(model, "quant_summary", None)
    notes = getattr(summary, "notes", None)
    if isinstance(notes, list):
        notes.append(f"QAT epoch selection: {why}")


__all__ = [
    "FeatureMatch",
    "NaNLossError",
    "QATQuantizer",
    "distillation_loss",
    "feature_layer_names",
    "fit_qat",
]
