"""eq.quantize: the entry point of post-training quantization."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from torch import nn

from edgequant.ptq.dynamic import quantize_dynamic
from edgequant.ptq.static import quantize_static
from edgequant.ptq.weight_only import quantize_weight_only
from edgequant.spec import Recipe

METHODS: dict[str, Callable[..., nn.Module]] = {
    "static": quantize_static,
    "dynamic": quantize_dynamic,
    "weight_only": quantize_weight_only,
}


def quantize(
    model: nn.Module,
    recipe: Recipe | str = "w8a8",
    calib_data: Iterable[Any] | None = None,
    method: str = "static",
    num_samples: int | None = None,
    progress: bool = False,
) -> nn.Module:
    """A quantized copy of `model` (fake-quantized, an ordinary nn.Module); `model` is untouched.

    calib_data: an iterable of model inputs (tensors, tuples of positional args, or dicts of
    keyword args); static quantization reads up to `num_samples` samples (default: the recipe's
    calib_samples, 512). The returned model carries `.quant_summary` (what was quantized, what was
    skipped and why) and `.quant_info`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(recipe, str):
        recipe = Recipe.preset(recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(
            f"recipe must be an edgequant.Recipe or a preset name, got {type(recipe).__name__}"
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    start = time.perf_counter()
    qmodel = METHODS[method](
        model, recipe, calib_data, num_samples or recipe.calib_samples, progress
    )
    cast("dict[str, Any]", qmodel.quant_info)["wall_s"] = time.perf_counter() - start
    return qmodel
