"""Batches as users pass them (a tensor, a tuple, a dict of tensors): run a model on one, count
its samples, describe it in an error, and check it and a metric's value for NaN and Inf; a
list of them from what a user passed, and a run that names the layer a batch fails in."""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def removing_hooks(handles: list[Any]) -> Iterator[None]:
    """Remove the hook `handles` (torch's RemovableHandle) when the block exits, even on error,
    so that no hook outlives the run it was registered for."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block; afterwards, even on error, every module's training
    flag as the caller left it."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def call_model(model: nn.Module, batch: Any, index: int = 0) -> Any:
    """Run the model on one calibration item: a tensor, a tuple of positional args, or a dict of
    keyword args (a Hugging Face tokenizer batch)."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        try:
            return model(*batch)
        except TypeError as err:
            if len(batch) == 2:
                raise TypeError(
                    f"calling the model on calibration item {index} failed ({err}); tuples are passed as "
                    "positional arguments: if your loader yields (inputs, labels), pass "
                    "(x for x, _ in loader)"
                ) from err
            raise
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return model(**dict(batch))
    raise TypeError(
        f"calibration items must be tensors, tuples of tensors or dicts of keyword arguments; got {type(batch).__name__}"
    )


def batch_size(batch: Any) -> int:
    """Number of samples in one calibration item (dim 0 of its first tensor)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    values: Iterable[Any] = batch.values() if hasattr(batch, "values") else batch
    for v in values:
        if isinstance(v, Tensor):
            return int(v.shape[0]) if v.dim() > 0 else 1
    raise TypeError(f"calibration item of type {type(batch).__name__} holds no tensor")


def describe_batch(batch: Any) -> str:
    """What one model input holds, for errors: 'a Tensor (4, 7) float32', 'a tuple of ...'; the
    device where it is not the CPU. Every error that names a batch (calibration, export,
    verification, compare) describes it with this."""

    def one(v: Any) -> str:
        if isinstance(v, Tensor):
            where = "" if v.device.type == "cpu" else f" on {v.device}"
            return f"Tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}{where}"
        return type(v).__name__

    if isinstance(batch, Tensor):
        return f"a {one(batch)}"
    if isinstance(batch, (tuple, list)):
        more = ", ..." if len(batch) > 4 else ""
        return f"a {type(batch).__name__} of {', '.join(one(v) for v in batch[:4])}{more}"
    if hasattr(batch, "items"):
        items = list(batch.items())
        more = ", ..." if len(items) > 4 else ""
        return "a mapping of " + ", ".join(f"{k}: {one(v)}" for k, v in items[:4]) + more
    return f"a {type(batch).__name__}"


def metric_number(value: Any, fn: str, what: str, finite: bool = True) -> float:
    """What a user's metric function (`fn`: "eval_fn", "val_fn") returned for `what`, as a float:
    an int, a float, a numpy scalar, a one-element tensor or array. Anything else is a TypeError
    naming the type (and shape); with finite=True a NaN or Inf is a ValueError, because it
    compares false with every tolerance and would quietly accept or reject everything."""
    number: float | None = None
    if getattr(value, "size", None) == 1 or (isinstance(value, Tensor) and value.numel() == 1):
        value = value.item()  # one-element numpy arrays and tensors, whatever their shape
    if not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            number = None
    if number is None:
        shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(
            f"{fn} must return a number (a float), but for {what} it returned {type(value).__name__}{shape} "
            f"{shown}"
        )
    if finite and not math.isfinite(number):
        raise ValueError(
            f"{fn} returned {number} for {what}: it must return a finite number, so that it can "
            "be compared with the FP32 model's and the tolerance"
        )
    return number


def nonfinite(t: Any, nan_only: bool = False) -> int:
    """How many values of `t` are NaN (or, unless nan_only, +-Inf); 0 for anything that is not a
    float tensor with data. The one test behind every "holds NaN" refusal: calibration items
    (check_finite), QAT's training batches, export's example and verification inputs."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.is_meta:
        return 0
    bad = torch.isnan(t) if nan_only else ~torch.isfinite(t)
    return int(bad.sum())


def check_finite(batch: Any, index: int) -> None:
    tensors: Iterable[Any]
    if isinstance(batch, Tensor):
        tensors = [batch]
    else:
        tensors = batch.values() if hasattr(batch, "values") else batch
    for t in tensors:
        if count := nonfinite(t):
            raise ValueError(
                f"calibration item {index} holds NaN or Inf in the model's input ({count} of "
                f"{t.numel()} values)"
            )


# --- inputs ---------------------------------------------------------------------------------


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys"):
        return (), dict(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors; "
        f"got {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def naming_the_batch(batch: Any, what: str) -> Iterator[None]:
    """A RuntimeError raised while the model runs on `batch` (torch's "mat1 and mat2 shapes
    cannot be multiplied", a dtype mismatch) becomes a ValueError naming the batch (`what`, e.g.
    "calib_data item 3") and its shapes. Errors raised outside the model's forward pass
    (batches.call_model) go through unchanged."""
    try:
        yield
    except RuntimeError as err:
        if not any(f.name == "call_model" for f in traceback.extract_tb(err.__traceback__)):
            raise
        raise ValueError(
            f"the model failed on {what} ({describe_batch(batch)}): {type(err).__name__}: "
            f"{err}; is it what the model's forward takes (shapes, dtypes)?"
        ) from err


def batch_list(data: Any, name: str) -> list[Any]:
    """An iterable of batches (a list, a DataLoader) as a list; a TypeError naming `name` for a
    bare tensor (iterating it would give single samples, not batches) or a non-iterable."""
    if isinstance(data, Tensor):
        raise TypeError(
            f"{name} must be an iterable of batches (a list or a DataLoader), got a tensor of "
            f"shape {tuple(data.shape)}: pass [x] for one batch, or list(x.split(64))"
        )
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be an iterable of batches (a list or a DataLoader), "
            f"got {type(data).__name__}"
        )
    return list(data)


def input_tensors(batch: Any) -> list[tuple[str, Tensor]]:
    """(position, tensor) of each tensor of a batch: "[0]", "[1]"... or "['input_ids']"."""
    args, kwargs = split_inputs(batch)
    found = [(f"[{i}]", a) for i, a in enumerate(args) if isinstance(a, Tensor)]
    return found + [(f"[{k!r}]", v) for k, v in kwargs.items() if isinstance(v, Tensor)]


def check_batch_values(batch: Any, what: str) -> None:
    """ValueError naming `what` for a batch that cannot verify anything: NaN, or no samples."""
    for pos, t in input_tensors(batch):
        if t.dim() and t.shape[0] == 0:
            raise ValueError(f"{what}{pos} has an empty batch (shape {tuple(t.shape)})")
        if count := nonfinite(t, nan_only=True):
            raise ValueError(
                f"{what}{pos} holds NaN ({count} of {t.numel()} values): "
                "a model cannot be verified on it"
            )


def run_checked(model: nn.Module, batch: Any, what: str) -> Any:
    """model(batch) without gradients; a ValueError naming `what`, its shapes and the innermost
    layer that failed when the model cannot run it (a wrong shape, dtype or device)."""
    names = {m: n for n, m in model.named_modules()}
    entered: list[nn.Module] = []

    def enter(mod: nn.Module, inputs: Any) -> None:
        entered.append(mod)

    def leave(mod: nn.Module, inputs: Any, output: Any) -> None:
        if entered and entered[-1] is mod:
            entered.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in names]
    hooks += [m.register_forward_hook(leave) for m in names]
    args, kwargs = split_inputs(batch)
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as err:
        where = ""
        if entered and names.get(entered[-1]):
            where = f"layer {names[entered[-1]]!r} ({type(entered[-1]).__name__}) raised "
        raise ValueError(
            f"{what} ({describe_batch(batch)}) do not run through the model: "
            f"{where}{type(err).__name__}: {err}"
        ) from err
    finally:
        for h in hooks:
            h.remove()
