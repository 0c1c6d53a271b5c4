"""eq.quantize: the entry point of post-training quantization."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from torch import nn

from edgequant.instrument import attach_info
from edgequant.modules import QuantLinear
from edgequant.ptq.dynamic import build_dynamic, quantize_dynamic
from edgequant.ptq.smooth import resize_input
from edgequant.ptq.static import build_static, quantize_static
from edgequant.ptq.weight_only import build_weight_only, quantize_weight_only
from edgequant.spec import Recipe

METHODS: dict[str, Callable[..., nn.Module]] = {
    "static": quantize_static,
    "dynamic": quantize_dynamic,
    "weight_only": quantize_weight_only,
}


def _check_arguments(model: nn.Module, recipe: Recipe | str, method: str) -> Recipe:
    """The checks quantize and load share; returns the recipe (a preset name resolved)."""
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
    return recipe


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
    recipe = _check_arguments(model, recipe, method)
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    start = time.perf_counter()
    qmodel = METHODS[method](
        model, recipe, calib_data, num_samples or recipe.calib_samples, progress
    )
    cast("dict[str, Any]", qmodel.quant_info)["wall_s"] = time.perf_counter() - start
    return qmodel


BUILDERS = {"static": build_static, "dynamic": build_dynamic, "weight_only": build_weight_only}


def load(
    model: nn.Module,
    recipe: Recipe | str,
    state: dict[str, Any] | str | os.PathLike[str],
    example_inputs: Any,
    method: str = "static",
) -> nn.Module:
    """Rebuild a quantized model saved with ``torch.save(qmodel.state_dict(), path)``.

    Pass the float model, recipe and method it was quantized with, and one batch of inputs
    (to trace the layers as quantize did); no calibration runs. `model` is not modified.
    """
    import torch

    recipe = _check_arguments(model, recipe, method)
    if isinstance(state, (str, os.PathLike)):
        path = Path(state)
        if not path.is_file():
            raise FileNotFoundError(f"no saved state at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a state_dict or a path to one, got {type(state).__name__}")
    qmodel, summary, recipe = BUILDERS[method](model, recipe, example_inputs)
    # Buffers that exist only once a pass has run (SmoothQuant, outlier splitting) are created
    # before loading; a split layer's weight takes the split width.
    for key, value in state.items():
        if key.endswith((".input_smooth_inv", ".input_channel_index")):
            layer_name, buffer = key.rsplit(".", 1)
            layer = qmodel.get_submodule(layer_name)
            setattr(layer, buffer, value.detach().clone())
            if buffer == "input_channel_index":
                if not isinstance(layer, QuantLinear):
                    raise ValueError(
                        f"the saved state splits the input channels of {layer_name!r}, which "
                        "is not a quantized Linear here (saved from another model?)"
                    )
                resize_input(layer, value.numel())
    try:
        qmodel.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"the saved state does not fit this model quantized with recipe {recipe.name!r} and method "
            f"{method!r} (was it saved from another recipe, method or model?): {err}"
        ) from err
    attach_info(
        qmodel,
        summary,
        {
            "method": method,
            "recipe": recipe.to_dict(),
            "samples_used": 0,
            "labels_used": False,
            "loaded": True,
        },
    )
    return qmodel.eval()
