"""eq.quantize: the entry point of post-training quantization."""

from __future__ import annotations

import fnmatch
import os
import pickle
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from edgequant.batches import naming_the_batch
from edgequant.check import WHOLE_WINDOWS_ONLY, require_target_fits
from edgequant.modules import QUANT_MODULES, QuantLinear
from edgequant.ptq.calibrate import check_context, peek
from edgequant.ptq.dynamic import build_dynamic, quantize_dynamic
from edgequant.ptq.outlier_split import resize_input
from edgequant.ptq.static import build_static, quantize_static
from edgequant.ptq.weight_only import build_weight_only, quantize_weight_only
from edgequant.quantizer import quantizers
from edgequant.recipe import Recipe
from edgequant.summary import attach_info
from edgequant.targets import TARGETS

METHODS: dict[str, Callable[..., nn.Module]] = {
    "static": quantize_static,
    "dynamic": quantize_dynamic,
    "weight_only": quantize_weight_only,
}


def check_recipe_fits(model: nn.Module, recipe: Recipe) -> None:
    """Every override and skip pattern of `recipe` names a module of `model` (a typo would
    otherwise leave the layer at the default specs, silently), and every weight spec's axis is a
    dim of the weights it applies to."""
    layers = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in layers]
    types = sorted({type(m).__name__ for _, m in layers})
    patterns = [("skip", p) for p in recipe.skip] + [
        ("override", o.pattern) for o in recipe.overrides
    ]
    for kind, pattern in patterns:
        match = re.compile(fnmatch.translate(pattern)).match
        if pattern not in types and not any(match(n) for n in names):
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ValueError(
                f"recipe {recipe.name!r}: {kind} pattern {pattern!r} matches no module of the "
                f"model; module names: {shown}; type names: {', '.join(types)}"
            )
    for name, module in layers:
        if type(module) not in QUANT_MODULES:
            continue
        spec, _, _ = recipe.specs_for(name, type(module).__name__)
        dims = module.weight.dim()
        if spec is not None and not spec.per_tensor and not -dims <= spec.axis < dims:
            raise ValueError(
                f"layer {name!r}: the weight spec's axis {spec.axis} ({spec.short()}) is not a "
                f"dim of its weight of shape {tuple(module.weight.shape)}; valid axes: "
                f"0..{dims - 1}"
            )


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
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    check_recipe_fits(model, recipe)
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
    if num_samples is not None and (
        not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1
    ):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    # Refuse what the target cannot run, before any work (the first batch gives the shapes).
    first, fully_integer = None, TARGETS[recipe.target].fully_integer
    if (fully_integer and method == "static") or (
        not fully_integer and recipe.target in WHOLE_WINDOWS_ONLY and calib_data is not None
    ):
        first, calib_data = peek(calib_data)
    require_target_fits(model, recipe.target, method, first)
    if calib_data is not None:
        first, calib_data = peek(calib_data)
        check_context(model, first, "calib_data item 0")
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

    recipe = _check_arguments(model, recipe, method)
    if isinstance(state, (str, os.PathLike)):
        state = _read_state(Path(state))
    if not isinstance(state, dict):
        raise TypeError(f"state must be a state_dict or a path to one, got {type(state).__name__}")
    if example_inputs is None:
        raise ValueError(
            "example_inputs is required: one batch of model inputs (as calib_data yields them) "
            "to trace the layers as quantize did"
        )
    with naming_the_batch(example_inputs, "example_inputs"):
        qmodel, summary, recipe = BUILDERS[method](model, recipe, example_inputs)
    _create_pass_buffers(qmodel, state, recipe)
    try:
        qmodel.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"the saved state does not fit this model quantized with recipe {recipe.name!r} and method "
            f"{method!r} (was it saved from another recipe, method or model?): {err}"
        ) from err
    _check_saved_method(qmodel, method)
    _check_saved_granularity(qmodel, recipe)
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


def _read_state(path: Path) -> Any:
    """What torch.save wrote at path (a state_dict, checked by the caller), read with
    weights_only=True."""
    if path.is_dir():
        raise IsADirectoryError(
            f"state: {path} is a folder; pass the file that "
            "torch.save(qmodel.state_dict(), path) wrote"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no saved state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file it cannot read
        detail = (
            "it holds objects other than tensors, a pickled model perhaps, which loading "
            "with weights_only=True refuses"
            if isinstance(err, pickle.UnpicklingError)
            else f"{type(err).__name__}: {str(err).strip()[:200]}"
        )
        raise ValueError(
            f"{path} is not a saved state_dict that torch.load can read safely ({detail}); "
            "save the quantized model with torch.save(qmodel.state_dict(), path)"
        ) from err
    return state


def _create_pass_buffers(qmodel: nn.Module, state: dict[str, Any], recipe: Recipe) -> None:
    """Buffers that exist only once a pass has run (SmoothQuant, outlier splitting) are created
    before loading; a split layer's weight takes the split width."""
    for key, value in state.items():
        if key.endswith((".input_smooth_inv", ".input_channel_index", ".input_block_int8")):
            layer_name, buffer = key.rsplit(".", 1)
            try:
                layer = qmodel.get_submodule(layer_name)
            except AttributeError:
                raise ValueError(
                    f"the saved state holds {key!r}, but the model quantized with recipe "
                    f"{recipe.name!r} has no layer {layer_name!r} (saved from another model?)"
                ) from None
            setattr(layer, buffer, value.detach().clone())
            if buffer == "input_channel_index":
                if not isinstance(layer, QuantLinear):
                    raise ValueError(
                        f"the saved state splits the input channels of {layer_name!r}, which "
                        "is not a quantized Linear here (saved from another model?)"
                    )
                resize_input(layer, value.numel())


def _check_saved_granularity(qmodel: nn.Module, recipe: Recipe) -> None:
    """A dynamic model's saved quantizers say per token or per tensor; the recipe must agree,
    or quant_info would describe another model than the one loaded."""
    dynamic = [q for q in quantizers(qmodel) if q.role == "activation" and q.mode == "dynamic"]
    if not dynamic:
        return
    saved = "token" if dynamic[0].per_token else "tensor"
    if saved != recipe.dynamic_activation:
        raise ValueError(
            f"the saved state quantizes activations per {saved} at run time, but recipe "
            f"{recipe.name!r} says dynamic_activation={recipe.dynamic_activation!r}; pass a "
            f"recipe with dynamic_activation={saved!r}"
        )


def _check_saved_method(qmodel: nn.Module, method: str) -> None:
    """Static and dynamic models of a plain stack of layers hold the same keys; the quantizers'
    saved modes tell them apart (and would otherwise override the method asked for)."""
    modes = {q.mode for q in quantizers(qmodel) if q.role == "activation"}
    saved = "dynamic" if "dynamic" in modes else "static" if "quantize" in modes else None
    if saved is not None and method in ("static", "dynamic") and saved != method:
        raise ValueError(
            f"the saved state was quantized with method {saved!r} (its activation ranges are "
            f"{'computed at run time' if saved == 'dynamic' else 'fixed'}), not method={method!r}; "
            f"pass method={saved!r}"
        )
