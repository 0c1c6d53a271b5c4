"""The operator check, before any calibration or training: which ops of a model a hardware target
cannot run in integer, and what to do about each (keep it in float where the target allows,
a known replacement, or refuse).

`check(model, target, example_inputs)` traces a PyTorch model with torch.fx (forward hooks on
the modules when fx cannot trace it); `export.check_onnx.check_onnx(path, target)` reads an ONNX graph. Both
return a CheckResult: one row per op instance the target cannot run in integer, and `ok`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from edgequant.check.ops import (
    KEEP_FLOAT,
    ONNX_INTEGER,
    ONNX_NAMED,
    REFUSE,
    REMOVE,
    REPLACE,
    SHAPE_ONLY_ONNX,
    WHOLE_WINDOWS_ONLY,
    ZEROS,
)
from edgequant.check.result import CheckResult, OpRow, op_row, target_spec
from edgequant.check.trace import check_fx, check_hooks

__all__ = [
    "KEEP_FLOAT",
    "ONNX_INTEGER",
    "ONNX_NAMED",
    "REFUSE",
    "REMOVE",
    "REPLACE",
    "SHAPE_ONLY_ONNX",
    "ZEROS",
    "CheckResult",
    "OpRow",
    "check",
    "op_row",
    "require_target_fits",
    "target_spec",
]


def check(model: nn.Module, target: str, example_inputs: Any = None) -> CheckResult:
    """Which ops of `model` `target` cannot run in integer, and the choice for each: keep in
    float (targets whose runtime allows float ops between quantized layers), a known
    replacement, remove (a monotonic op at the output) or refuse. No calibration needed.

    Traces with torch.fx; a model fx cannot trace is checked with forward hooks on its
    modules instead (needs example_inputs; functional ops are then invisible, and the result
    says so). Unknown target: ValueError listing the known ones.
    """
    spec = target_spec(target)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    result = CheckResult(target=spec.name, fully_integer=spec.fully_integer)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            check_fx(model, example_inputs, result)
        except Exception as err:  # fx fails in many ways on dynamic Python
            if example_inputs is None:
                raise ValueError(
                    f"torch.fx cannot trace the model ({type(err).__name__}: {err}); pass "
                    "example_inputs so that check can follow the modules with hooks"
                ) from err
            result.rows.clear()
            result.integer_ops.clear()
            result.traced_with = "forward hooks"
            result.notes.append(
                f"torch.fx could not trace the model ({type(err).__name__}): only module calls "
                "were seen; functional ops (torch.*, F.*, operators) are not in this list"
            )
            check_hooks(model, example_inputs, result)
    finally:
        for m, flag in flags.items():
            m.training = flag
    return result


def require_target_fits(
    model: nn.Module, target: str, method: str, example_inputs: Any = None
) -> None:
    """ValueError before any calibration when `target` cannot take `model` quantized by
    `method`, naming the op and the layer.

    A fully integer target (mcu-int8) refuses every op `check` refuses, must replace, or would
    remove at the output, and every method but static quantization (the only one that gives
    integer activations everywhere). The other targets whose files have no adaptive max pool
    (tflite-int8, executorch) refuse one whose windows differ in size; that takes the shapes
    of example_inputs, and without them (or where the model does not trace) the exporter
    refuses it instead.
    """
    spec = target_spec(target)
    if spec.fully_integer and method != "static":
        _refuse_method(model, spec.name, method)
    if not spec.fully_integer:
        if spec.name not in WHOLE_WINDOWS_ONLY or example_inputs is None:
            return
        try:
            result = check(model, spec.name, example_inputs)
        except Exception:  # the exporter refuses it instead; quantizing needs no trace
            return
    else:
        result = check(model, spec.name, example_inputs)
    bad = [r for r in result.rows if r.action != KEEP_FLOAT]
    if bad:
        listed = "; ".join(f"op {r.op!r} at {r.node!r} ({r.action}: {r.choice})" for r in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        need = "a fully integer graph" if spec.fully_integer else "ops its files can express"
        raise ValueError(
            f"target {spec.name!r} needs {need}, and this model has ops it cannot run"
            f"{' in integer' if spec.fully_integer else ''}: {listed}{more}. Nothing was "
            "calibrated; `edgequant check` lists every one"
        )


def _refuse_method(model: nn.Module, target: str, method: str) -> None:
    layers = [
        (n, type(m).__name__)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    where = f"layer {layers[0][0]!r} ({layers[0][1]}) and every other" if layers else "every"
    how = (
        "quantizes activations in float at run time (DynamicQuantizeLinear)"
        if method == "dynamic"
        else "keeps activations in float"
    )
    raise ValueError(
        f"method {method!r} {how}, and target {target!r} needs a fully integer graph: "
        f"{where} layer would compute on float activations; use method='static'"
    )
