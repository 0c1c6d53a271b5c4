"""compare's runs for an edge target, measured in that target's runtime too: a recipe for
`mcu-int8` is also written as a fully integer .tflite and scored in LiteRT (its default XNNPACK
path), one for `executorch` as a .pte scored in ExecuTorch; each file is verified against the
simulation by its exporter first, and timed at batch 1 in its runtime. The ONNX row stays the
run's main figure (the recommendation reads it); this one says what the device's runtime gives."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgequant.batches import split_inputs
from edgequant.export.edge_files import edge_latency_ms
from edgequant.recipe import Recipe

__all__ = ["EDGE_FORMATS", "edge_format", "edge_row"]

# Target -> the file its runtime takes.
EDGE_FORMATS = {"mcu-int8": ".tflite", "executorch": ".pte"}


def edge_format(recipe: Recipe) -> str | None:
    """The suffix of the edge file a run of `recipe` is also written as, or None."""
    return EDGE_FORMATS.get(str(recipe.target))


def _arrays(batch: Any) -> list[np.ndarray]:
    args, kwargs = split_inputs(batch)
    if kwargs:
        raise ValueError("edge runtimes take positional tensor inputs, not a dict batch")
    return [a.detach().cpu().float().numpy() for a in args]


def edge_row(
    qmodel: nn.Module,
    path: Path,
    example_inputs: Any,
    verify: list[Any],
    eval_fn: Callable[[Callable[[Any], torch.Tensor]], Any],
    latency_runs: int,
    threads: int,
) -> dict[str, Any]:
    """The run written for its edge runtime at `path` (.tflite or .pte), verified, scored by eval_fn there and timed: a
    dict for the row's "edge" entry ({"status": "failed", "error": ...} where any step fails,
    so the ONNX figures of the run stand)."""
    from edgequant.batches import metric_number
    from edgequant.export.executorch import ExecuTorchRunner, export_executorch
    from edgequant.export.tflite import export_tflite
    from edgequant.export.tflite_runtime import TFLiteRunner

    suffix = path.suffix  # edge_format(run's recipe): .tflite or .pte
    row: dict[str, Any] = {"format": suffix[1:], "path": str(path)}
    try:
        if suffix == ".tflite":
            info = export_tflite(qmodel, path, example_inputs, verify_data=verify)
            runner: Any = TFLiteRunner(path.read_bytes(), "litert")
            row["runtime"] = "LiteRT (default XNNPACK path)"
            row["arena_bytes"] = info.arena_bytes
        else:
            info = export_executorch(qmodel, path, example_inputs, verify_data=verify)
            runner = ExecuTorchRunner(path.read_bytes())
            row["runtime"] = "ExecuTorch (XNNPACK)"

        def predict(batch: Any) -> torch.Tensor:
            return torch.from_numpy(np.asarray(runner.run(_arrays(batch))[0]))

        row["top1_agreement"] = info.verification.top1_agreement
        row["size_bytes"] = info.size_bytes
        row["metric_deployed"] = metric_number(eval_fn(predict), "eval_fn", f"{path.name}")
        row["latency_ms"] = edge_latency_ms(path, runs=latency_runs, threads=threads)
        row["status"] = "ok"
    except Exception as err:  # the ONNX figures of the run stand; say why this one failed
        row["status"] = "failed"
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=5)
    return row
