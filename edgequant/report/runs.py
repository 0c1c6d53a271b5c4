"""The runs compare makes (Run, default_runs, runs_for) and how the QAT and mixed-precision runs
build their models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from edgequant.batches import batch_size
from edgequant.mixed import Budget, plan
from edgequant.ptq.quantize import quantize
from edgequant.qat import finalize, fit_qat, prepare_qat
from edgequant.qat.selection import holdout_split
from edgequant.recipe import Recipe
from edgequant.spec import weight_spec


@dataclass(frozen=True)
class Run:
    """One method to try: a name, its family, the PTQ method and the recipe.

    family "ptq": eq.quantize(method). "qat": eq.prepare_qat from the static PTQ start, then
    eq.fit_qat for `epochs` on compare's train_data, less a held-out slice (holdout_split), with
    the FP32 model as teacher; the epoch kept is chosen on the held-out slice by select_epoch,
    which keeps the PTQ start (epoch 0) unless an epoch is better by more than noise. "mixed": eq.mixed_precision picks
    per-layer weight bits (candidates 2, 3, 4, 8) under a packed-size budget of `budget_ratio`
    of the FP32 weights, then static PTQ with those bits.
    """

    name: str
    method: str
    recipe: Recipe
    family: str = "ptq"
    labels_used: bool = False
    epochs: int = 0
    lr: float | None = None  # None: fit_qat's default
    budget_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.family not in ("ptq", "qat", "mixed"):
            raise ValueError(
                f"Run {self.name!r}: family must be ptq, qat or mixed, got {self.family!r}"
            )
        if self.family == "qat" and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"Run {self.name!r}: a QAT run needs epochs >= 1, got {self.epochs!r}")
        if self.family == "mixed" and (self.budget_ratio is None or not 0 < self.budget_ratio <= 1):
            raise ValueError(
                f"Run {self.name!r}: a mixed run needs budget_ratio in (0, 1], got {self.budget_ratio!r}"
            )


def default_runs(qat: bool = True, qat_epochs: int = 3) -> list[Run]:
    """DESIGN §1's default set: PTQ dynamic W8, static W8A8, weight-only W4, static W4A8; QAT
    W8A8 and W4A4 (when there is training data); a mixed-precision plan at 3 bits per weight on
    average (activations 8-bit)."""
    runs = [
        Run("ptq-dynamic-w8a8", "dynamic", Recipe.preset("w8a8")),
        Run("ptq-static-w8a8", "static", Recipe.preset("w8a8")),
        Run("ptq-weight-only-w4", "weight_only", Recipe.preset("w4-weight-only")),
        Run("ptq-static-w4a8", "static", Recipe.preset("w4a8")),
        Run("ptq-static-w4a4", "static", Recipe.preset("w4a4")),
        Run(
            "mixed-w3avg-a8",
            "static",
            Recipe.preset("w4a8"),
            family="mixed",
            budget_ratio=3 / 32,
        ),
    ]
    if qat:
        runs += [
            Run("qat-w8a8", "static", Recipe.preset("w8a8"), family="qat", epochs=qat_epochs),
            Run("qat-w4a4", "static", Recipe.preset("w4a4"), family="qat", epochs=qat_epochs),
        ]
    return runs


def default_lm_runs(qat: bool = True, qat_epochs: int = 1) -> list[Run]:
    """The default set for a causal LM, whose export takes weight-only grids: weight-only PTQ at
    symmetric INT4 and INT3 in groups of 64 (the embedding and lm_head at 8 bits), and QAT at
    INT3 from its PTQ start (when there is training data)."""
    runs = []
    for bits in (4, 3):
        recipe = Recipe(
            name=f"int{bits}-g64",
            weight=weight_spec(bits, 64),
            activation=None,
            first_last_bits=8,
        )
        runs.append(Run(f"ptq-weight-only-int{bits}-g64", "weight_only", recipe))
        if qat and bits == 3:
            runs.append(
                Run(f"qat-int{bits}-g64", "weight_only", recipe, family="qat", epochs=qat_epochs)
            )
    return runs


def qat_start_as_is(run: Run) -> bool:
    """Whether a PTQ run's model is the start prepare_qat would build for the same recipe:
    weight-only, or static without SmoothQuant and outlier splitting (which QAT leaves out)."""
    if run.method == "weight_only":
        return run.recipe.weight_only
    return (
        run.method == "static"
        and run.recipe.smooth_alpha is None
        and run.recipe.split_outliers is None
    )


def batch_len(batch: Any) -> int:
    return batch_size(batch[0] if isinstance(batch, (tuple, list)) else batch)


def qat_model(
    model: nn.Module,
    run: Run,
    calib: list[Any],
    train_data: list[Any],
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    start: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prepare from the PTQ model (`start` where the caller already has it: a copy trains),
    fine-tune with distillation from `model` on train_data less a held-out slice, and keep the
    epoch that fit_qat's selection picks on that slice."""
    fit, held = holdout_split(train_data)
    bars = progress is not None
    # prepare_qat starts from the PTQ model at the same bits, its whole pipeline included
    # (learned rounding, bias correction).
    qmodel = prepare_qat(
        model,
        run.recipe,
        calib_data=calib,
        progress=bars,
        start=start if start is not None else "ptq",
    )
    if progress is not None:
        progress(f"{run.name}: QAT from the PTQ start, {run.epochs} epochs")
    settings: dict[str, Any] = {"lr": run.lr} if run.lr is not None else {}
    fit_qat(
        qmodel,
        fit,
        epochs=run.epochs,
        **settings,
        teacher=model,
        progress=bars,
        val_data=held,
        seed=seed,
    )
    chosen = cast("dict[str, Any]", qmodel.quant_info)["qat_selection"]
    # Classifiers are scored by held-out top-1 hits; causal LMs by held-out perplexity.
    evidence = {
        key: chosen[source]
        for key, source in (
            ("held_out_samples", "held_out_predictions"),
            ("held_out_samples", "held_out_sequences"),
            ("heldout_top1", "heldout_top1"),
            ("heldout_perplexity", "heldout_perplexity"),
        )
        if source in chosen
    }
    info = {
        "epochs": run.epochs,
        "kept_epoch": chosen["kept_epoch"],
        "selection": {
            **evidence,
            "trained_on_samples": sum(batch_len(b) for b in fit),
            "against": chosen["against"],
            "rule": chosen["rule"],
            "why": chosen["why"],
        },
    }
    final = finalize(qmodel)
    for attr in ("quant_summary", "quant_info"):
        if hasattr(qmodel, attr) and not hasattr(final, attr):
            setattr(final, attr, getattr(qmodel, attr))
    return final, info


def mixed_model(
    model: nn.Module, run: Run, calib: list[Any], progress: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    assert run.budget_ratio is not None
    act = run.recipe.activation.bits if run.recipe.activation is not None else None
    p = plan(
        model,
        calib,
        Budget(size_ratio=run.budget_ratio),
        act_bits=act,
        recipe=run.recipe,
        num_samples=min(256, sum(batch_len(b) for b in calib)),
        progress=progress,
    )
    qmodel = quantize(model, p.recipe, calib, method=run.method, progress=progress)
    return qmodel, {"mixed_bits": dict(p.bits), "packed_bytes": p.packed_bytes}


def runs_for(recipes: Sequence[Recipe | str], qat_epochs: int = 0) -> list[Run]:
    """One PTQ run per recipe: weight-only recipes run method weight_only, the others static;
    with qat_epochs >= 1, after each a QAT run ("qat-<recipe>") from that PTQ start."""
    if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
        raise ValueError(f"qat_epochs must be an int >= 0, got {qat_epochs!r}")
    if isinstance(recipes, (str, Recipe)):
        raise TypeError(
            f"recipes must be a list of Recipes or preset names, got the single {recipes!r}: "
            f"pass [{recipes!r}]"
            if isinstance(recipes, str)
            else f"recipes must be a list of Recipes or preset names, got a single Recipe "
            f"{recipes.name!r}: pass [recipe]"
        )
    runs = []
    for item in recipes:
        r = Recipe.preset(item) if isinstance(item, str) else item
        if not isinstance(r, Recipe):
            raise TypeError(
                f"recipes must hold Recipe objects or preset names, got {type(item).__name__}"
            )
        if r.weight_only:
            runs.append(
                Run(f"ptq-weight-only-{r.name.removesuffix('-weight-only')}", "weight_only", r)
            )
        else:
            runs.append(Run(f"ptq-static-{r.name}", "static", r))
        if qat_epochs:
            method = "weight_only" if r.weight_only else "static"
            runs.append(Run(f"qat-{r.name}", method, r, family="qat", epochs=qat_epochs))
    return runs
