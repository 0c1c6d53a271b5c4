"""Shared by the ResNet-20 QAT benchmarks (qat_resnet20.py, mixed_resnet20.py): augmented
training batches and QAT started from the PTQ model with the epoch kept by held-out KL; and the
plain training step the step-cost benchmarks (qat_speed.py, qat_step_plain.py) time."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

import edgequant as eq
from edgequant.qat import finalize
from edgequant.qat.oscillation import dampening_loss
from edgequant.qat.prepare import qat_quantizers, start_from

DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "aug": 1,
    "kd": 1.0,
    "t": 4.0,
    "epochs": 10,
    "slr": 1.0,
    "warm": 0.0,
    "mix": 0.0,
    "jpeg": 0.0,
    "avg": 0.0,
    "frozen": 0,
    "feat": 0.0,
    "bs": 128,
    "sgd": 0,
    "damp": 0.0,
    "grid": 0,
}


def parse_configs(text: str) -> list[dict[str, Any]]:
    """ "lr=1e-4,aug=1;lr=3e-5" -> settings dicts over DEFAULTS.

    kd: share of distillation; t: its temperature; slr: the learned ranges' learning rate as a
    fraction of lr; warm: warmup epochs; mix: mixup alpha on the inputs, labels dropped, for
    pure distillation (0 = off); jpeg: the chance that a training image is replaced, each time it
    is drawn, by its JPEG (quality 75) copy (cifar10.train_jpeg_split; 0 = off); avg: fit_qat's
    weight_average, the decay of the moving average of the trained parameters (0 = off); frozen=1:
    the weights and their grids stay as PTQ rounded them, and only the biases and the activation
    ranges train (0 = everything trains); feat: fit_qat's feature_weight, feature distillation of
    every quantized layer's input (0 = off); bs: the batch size (an epoch is still one pass over
    the images, so a smaller batch takes more steps in the same epochs); sgd=1: SGD with momentum
    0.9 instead of Adam (lr is then SGD's); damp: fit_qat's dampen_weight, oscillation dampening
    (Nagel et al. 2022; 0 = off); grid=1: fit_qat's lr_scaling="grid" (lr in grid steps), 0:
    "none", one absolute lr for every tensor, as every run recorded before the grid rule."""
    configs = []
    for item in filter(None, (c.strip() for c in text.split(";"))):
        config = dict(DEFAULTS)
        for pair in item.split(","):
            key, _, value = pair.partition("=")
            if key not in DEFAULTS:
                raise SystemExit(
                    f"--configs: unknown key {key!r} in {item!r}; known: {list(DEFAULTS)}"
                )
            config[key] = type(DEFAULTS[key])(float(value)) if key != "lr" else float(value)
        if config["epochs"] > 10:
            raise SystemExit("issue 9's budget is at most 10 epochs")
        configs.append(config)
    return configs


class Augmented:
    """Shuffled batches of (images, labels) with random crop (zero padding 4) and horizontal flip,
    drawn from the global torch generator (so fit_qat's checkpoints can resume the same order).
    jpeg > 0 (with x_jpeg, the same images JPEG-compressed): each image is drawn from x_jpeg with
    that chance. mixup > 0: each batch is blended with a shuffled copy of itself (weight ~
    Beta(mixup, mixup)) and yielded without labels: for distillation, where the teacher labels
    the blend."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 128,
        pad: int = 4,
        mixup: float = 0.0,
        x_jpeg: torch.Tensor | None = None,
        jpeg: float = 0.0,
    ) -> None:
        if jpeg > 0 and (x_jpeg is None or x_jpeg.shape != x.shape):
            raise ValueError("jpeg > 0 needs x_jpeg, the JPEG copies of x (same shape)")
        self.x, self.y, self.batch_size, self.pad, self.mixup = x, y, batch_size, pad, mixup
        self.x_jpeg, self.jpeg = x_jpeg, jpeg

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Any]:
        order = torch.randperm(len(self.x))
        h, w = self.x.shape[-2:]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.x[idx]
            if self.jpeg > 0:
                assert self.x_jpeg is not None
                pick = torch.rand(len(idx)) < self.jpeg
                x = torch.where(pick[:, None, None, None], self.x_jpeg[idx], x)
            x = F.pad(x, (self.pad,) * 4)
            n = x.shape[0]
            top = torch.randint(0, 2 * self.pad + 1, (n,))
            left = torch.randint(0, 2 * self.pad + 1, (n,))
            rows = (top[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1)
            cols = (left[:, None] + torch.arange(w))[:, None, None, :]  # (n, 1, 1, w)
            x = x[
                torch.arange(n)[:, None, None, None],
                torch.arange(x.shape[1])[None, :, None, None],
                rows,
                cols,
            ]
            flip = torch.rand(n) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if self.mixup > 0:
                lam = torch.distributions.Beta(self.mixup, self.mixup).sample((n, 1, 1, 1))
                yield (lam * x + (1 - lam) * x[torch.randperm(n)]).contiguous()
            else:
                yield x.contiguous(), self.y[idx]


def heldout_scores(
    model: torch.nn.Module, heldout: tuple[torch.Tensor, torch.Tensor], teacher_logp: torch.Tensor
) -> dict[str, float]:
    """KL to the FP32 outputs and top-1 accuracy on the held-out images, from one pass in eval
    mode (the model is left in eval mode)."""
    x, y = heldout
    with torch.no_grad():
        logp = torch.cat([F.log_softmax(model.eval()(b), -1) for b in x.split(256)])
    return {
        "heldout_kl": float(F.kl_div(logp, teacher_logp, log_target=True, reduction="batchmean")),
        "heldout_acc": int((logp.argmax(-1) == y).sum()) / len(y),
    }


def freeze_weights(qmodel: torch.nn.Module) -> None:
    """No gradient for the weights and the weight quantizers' parameters (their learned steps):
    what trains is the biases and the activation quantizers' parameters."""
    weight_quantizers = [q for q in qat_quantizers(qmodel) if q.role == "weight"]
    for q in weight_quantizers:
        q.requires_grad_(False)
    for module in qmodel.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and any(
            q in weight_quantizers for q in module.children()
        ):
            weight.requires_grad_(False)
    if not any(p.requires_grad for p in qmodel.parameters()):
        raise SystemExit("frozen=1 left nothing to train")


def qat_from_ptq(
    model: torch.nn.Module,
    ptq: torch.nn.Module,
    preset: str | eq.Recipe,
    calib: list[torch.Tensor],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    heldout: tuple[torch.Tensor, torch.Tensor],
    teacher_logp: torch.Tensor,
    config: dict[str, Any],
    seed: int = 0,
    heldout_jpeg: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    train_x_jpeg: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """QAT from the PTQ model; the epoch kept (0 = the PTQ start) has the lowest held-out KL:
    on the held-out images, or with heldout_jpeg (images, labels, FP32 log-probabilities of
    cifar10.heldout_jpeg_split) the mean of the KLs on the clean and the JPEG'd held-out images.
    train_x_jpeg: the JPEG copies of train_x, for config["jpeg"] > 0."""
    torch.manual_seed(seed)
    qmodel = eq.prepare_qat(model, preset, calib_data=calib)
    start_from(qmodel, ptq)
    if config["frozen"]:
        freeze_weights(qmodel)
    if config["aug"]:
        train: Any = Augmented(
            train_x,
            train_y,
            batch_size=config["bs"],
            mixup=config["mix"],
            x_jpeg=train_x_jpeg,
            jpeg=config["jpeg"],
        )
    else:
        if config["jpeg"] > 0:
            raise SystemExit("--configs: jpeg > 0 needs aug=1")
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        train = list(
            zip(train_x[order].split(config["bs"]), train_y[order].split(config["bs"]), strict=True)
        )
    epochs: list[dict[str, Any]] = []
    best: dict[str, Any] = {}

    def evaluate(epoch: int, record: dict[str, Any] | None = None) -> None:
        row: dict[str, Any] = {"epoch": epoch, **heldout_scores(qmodel, heldout, teacher_logp)}
        row["score"] = row["heldout_kl"]
        if not config["frozen"]:  # the latent weights' mean squared distance from the grid
            with torch.no_grad():
                row["grid_distance"] = float(dampening_loss(qmodel))
        if heldout_jpeg is not None:
            jpeg = heldout_scores(qmodel, heldout_jpeg[:2], heldout_jpeg[2])
            row.update(heldout_jpeg_kl=jpeg["heldout_kl"], heldout_jpeg_acc=jpeg["heldout_acc"])
            row["score"] = (row["heldout_kl"] + row["heldout_jpeg_kl"]) / 2
        if record is not None:
            row.update(loss=record["loss"], wall_s=record["wall_s"])
        epochs.append(row)
        label = preset if isinstance(preset, str) else preset.name
        print(f"  {label} {config} epoch {epoch}: {json.dumps(row)}", flush=True)
        if not best or row["score"] < best["score"]:
            best.update(row, state=copy.deepcopy(qmodel.state_dict()))

    evaluate(0)
    start = time.perf_counter()
    eq.fit_qat(
        qmodel,
        train,
        epochs=int(config["epochs"]),
        lr=config["lr"],
        optimizer="sgd" if config["sgd"] else "adam",
        teacher=model,
        temperature=config["t"],
        kd_weight=config["kd"],
        range_lr_scale=config["slr"],
        lr_scaling="grid" if config["grid"] else "none",
        warmup_epochs=config["warm"],
        weight_average=config["avg"],
        feature_weight=config["feat"],
        dampen_weight=config["damp"],
        on_epoch_end=evaluate,
        progress=False,
        seed=seed,
    )
    train_s = time.perf_counter() - start
    qmodel.load_state_dict(best.pop("state"))
    return finalize(qmodel), {
        "config": config,
        "by_epoch": epochs,
        "kept_epoch": best["epoch"],
        "kept": best,
        "train_wall_s": train_s,
    }


def train_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    make_optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
) -> Callable[[], None]:
    """One step of a plain training loop (zero_grad, forward, cross-entropy, backward, step) on
    a fixed batch, the optimizer built once over the trainable parameters; the model in train
    mode."""
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step
