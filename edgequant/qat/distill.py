"""Distillation from the FP32 teacher: soft-label KD (Hinton et al. 2015, "Distilling the
knowledge in a neural network": KL divergence of temperature-softened logits, times T^2, mixed
with cross-entropy where labels are given) and feature matching of every quantized layer's input
(as block reconstruction does in PTQ: Li et al. 2021, BRECQ)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from edgequant.qat.base import QATQuantizer


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


__all__ = ["FeatureMatch", "distillation_loss", "feature_layer_names"]
