"""eq.compare: run the FP32 baseline and each quantization method, export each one, measure the
exported model in ONNX Runtime, and recommend the cheapest method that is good enough.

Every run is isolated: a method that fails is reported as failed and the others go on
(DESIGN §3, invariant 4). `metric_deployed` always comes from the exported model run in ONNX
Runtime, never from the simulation.
"""

import copy
import dataclasses
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from edgequant.batches import batch_list, call_model, metric_number, run_checked
from edgequant.bench import decode_speed, latency_ms
from edgequant.export.lm import export_lm_onnx, lm_session
from edgequant.export.onnx import export_float_onnx, export_onnx
from edgequant.export.verify import exact_session, ort_feed
from edgequant.metrics import logits_of
from edgequant.ptq.quantize import quantize
from edgequant.ptq.weight_only import is_llama_style
from edgequant.recipe import Recipe
from edgequant.report.direction import default_lower_is_better, tolerance_rule
from edgequant.report.edge_runs import edge_format, edge_row
from edgequant.report.recommend import recommend
from edgequant.report.results import Report, out_folder
from edgequant.report.runs import (
    Run,
    batch_len,
    default_lm_runs,
    default_runs,
    mixed_model,
    qat_model,
    qat_start_as_is,
    runs_for,
)
from edgequant.summary import Summary

# A causal LM's export is verified token by token on at most this many windows of verify_data.
LM_VERIFY_WINDOWS = 8

# A predict function maps one batch of model inputs to the model's (first) output tensor.
Predict = Callable[[Any], torch.Tensor]
EvalFn = Callable[[Predict], float]


def stderr_progress(quiet: bool = False) -> Callable[[str], None] | None:
    """compare's `progress` for a command line: timestamped one-line messages on stderr (and,
    since it is not None, the steps' tqdm bars), or None when quiet (nothing at all)."""
    if quiet:
        return None

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return say


def torch_predict(model: nn.Module) -> Predict:
    def predict(batch: Any) -> torch.Tensor:
        with torch.no_grad():
            out = call_model(model.eval(), batch)
        if getattr(out, "logits", None) is not None:  # a Hugging Face output: its logits
            return logits_of(out)
        leaves, _ = torch.utils._pytree.tree_flatten(out)
        return leaves[0]

    return predict


def token_ids(batch: Any, what: str = "batch") -> torch.Tensor:
    """The (batch, tokens) int64 token ids of a causal LM's input: a tensor or a tokenizer
    batch's "input_ids"; TypeError naming what it got otherwise (text, say)."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise TypeError(
            f"{what}: a causal LM's input is a (batch, tokens) tensor of token ids or a dict with "
            f"'input_ids' (a tokenizer's output), got {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
        )
    return ids.long()


def lm_predict(path: str | Path, threads: int = 2) -> Predict:
    """A causal LM exported by export_lm_onnx, run in ONNX Runtime: each sequence of the batch
    from an empty KV cache; returns the logits (batch, tokens, vocabulary)."""
    session = lm_session(path, threads)
    past = [i for i in session.get_inputs() if i.name.startswith("past_")]

    def predict(batch: Any) -> torch.Tensor:
        out = []
        for row in token_ids(batch):
            feeds: dict[str, np.ndarray] = {
                i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past
            }
            feeds["input_ids"] = row.reshape(1, -1).numpy()
            out.append(torch.from_numpy(np.asarray(session.run(["logits"], feeds)[0])))
        return torch.cat(out)

    return predict


def ort_predict(path: str | Path, threads: int = 2) -> Predict:
    """The exported model run in ONNX Runtime, as verification runs it (export.verify.
    exact_session): on an x86 CPU without VNNI, a signed-activation target's INT8 weights run as
    the same grid in UINT8, since ONNX Runtime's u8s8 kernel saturates there and a device that
    runs the file (TFLite Micro, a VNNI CPU) would not."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess, _ = exact_session(path, opts)
    names = [i.name for i in sess.get_inputs()]

    def predict(batch: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(sess.run(None, ort_feed(names, batch))[0]))

    return predict


def _metric(value: Any, what: str) -> float:
    """eval_fn's result as a finite float (batches.metric_number)."""
    return metric_number(value, "eval_fn", what)


def _environment(threads: int) -> dict[str, Any]:
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
    }


def _resolve_runs(
    recipes: Sequence[Recipe | str] | None, runs: Sequence[Run] | None, qat: bool, lm: bool = False
) -> list[Run]:
    """The runs compare makes: explicit Runs, one PTQ run per recipe, or default_runs()
    (default_lm_runs() for a causal LM)."""
    if recipes is not None and runs is not None:
        raise ValueError("give recipes or runs, not both")
    if runs is not None:
        runs = list(runs)
        bad = [r for r in runs if not isinstance(r, Run)]
        if bad:
            raise TypeError(
                f"runs must hold Run objects, got {type(bad[0]).__name__} {bad[0]!r} "
                "(for preset names use recipes=[...])"
            )
    if recipes is not None:
        chosen = runs_for(recipes)
    elif runs is not None:
        chosen = list(runs)
    else:
        chosen = default_lm_runs(qat=qat) if lm else default_runs(qat=qat)
    names = [r.name for r in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    return list(chosen)


def _check_compare_args(
    model: Any, eval_fn: Any, tolerance: Any, progress: Any, lower_is_better: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(eval_fn):
        raise TypeError(
            "eval_fn must be a callable taking a predict function and returning the metric"
        )
    if lower_is_better is not None and not isinstance(lower_is_better, bool):
        raise TypeError(f"lower_is_better must be True, False or None, got {lower_is_better!r}")
    # Higher is better: an absolute drop below 1; lower is better: a relative rise, any size.
    valid = "a number >= 0 (a relative rise)" if lower_is_better else "a number in [0, 1)"
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be {valid}, got {tolerance!r}")
    if not (0 <= tolerance < float("inf") if lower_is_better else 0 <= tolerance < 1):
        raise ValueError(f"tolerance must be {valid}, got {tolerance}")
    if progress is not None and not callable(progress):
        raise TypeError(
            f"progress must be a callable taking a message (e.g. stderr_progress()) or None, "
            f"got {progress!r}"
        )


@dataclasses.dataclass
class _Session:
    """What every run of one compare call shares: the FP32 model, the data, where models go,
    how latency is measured and how progress is told."""

    model: nn.Module
    eval_fn: EvalFn
    example_inputs: Any
    calib: list[Any]
    verify: list[Any]
    train: list[Any] | None
    models_dir: Path
    latency_batch_sizes: tuple[int, ...]
    latency_runs: int
    threads: int
    metric: str
    progress: Callable[[str], None] | None
    lm: bool = False  # a LLaMA-style causal LM: LM export, perplexity windows, decode speed
    # The (method, recipe) of every QAT run, and the PTQ runs' models kept for them: a QAT run
    # of the same recipe starts from its PTQ run's model instead of quantizing again
    # (prepare_qat(start=...)); a PTQ model no QAT run wants is not held.
    qat_recipes: frozenset[tuple[str, Recipe]] = frozenset()
    ptq_models: dict[tuple[str, Recipe], nn.Module] = dataclasses.field(default_factory=dict)

    def predict(self, path: Path) -> Predict:
        return lm_predict(path, self.threads) if self.lm else ort_predict(path, self.threads)

    def verify_windows(self) -> torch.Tensor:
        """The verification batches' token ids, one (windows, tokens) tensor, at most
        LM_VERIFY_WINDOWS windows (each run's metric is measured deployed and simulated on all
        of the evaluation data besides)."""
        ids = [token_ids(b, f"verify_data item {i}") for i, b in enumerate(self.verify)]
        if len({t.shape[1] for t in ids}) != 1:
            raise ValueError(
                "verify_data for a causal LM must hold windows of one length, got "
                f"{sorted({t.shape[1] for t in ids})} tokens"
            )
        return torch.cat(ids)[:LM_VERIFY_WINDOWS]

    def speed(self, path: Path) -> dict[str, Any]:
        """latency_ms per batch size; for a causal LM, decode speed at batch 1 with the KV
        cache ({"bs1": ms per token}), tokens per second and peak memory."""
        if not self.lm:
            return {"latency_ms": self.latency(path)}
        found = decode_speed(path, runs=max(1, min(self.latency_runs, 5)), threads=self.threads)
        return {
            "latency_ms": {"bs1": found["ms_per_token"]},
            "tokens_per_s": found["tokens_per_s"],
            "peak_memory_bytes": found["peak_memory_bytes"],
        }

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)

    def latency(self, path: Path) -> dict[str, float]:
        return latency_ms(
            path, batch_sizes=self.latency_batch_sizes, runs=self.latency_runs, threads=self.threads
        )

    @property
    def has_labels(self) -> bool:
        t = self.train
        return bool(t) and isinstance(t[0], (tuple, list)) and len(t[0]) == 2  # type: ignore[index]


def _models_dir(out_dir: str | Path | None) -> Path:
    """out_dir/models, or a temporary folder when out_dir is None; made."""
    folder = (
        out_folder(out_dir, "out_dir") / "models"
        if out_dir is not None
        else Path(tempfile.mkdtemp(prefix="edgequant-"))
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _baseline(sess: _Session, example_name: str) -> dict[str, Any]:
    """The FP32 model exported, scored in ONNX Runtime and PyTorch, sized and timed."""
    sess.say("FP32 baseline: export and measure in ONNX Runtime")
    start = time.perf_counter()
    fp32_path = sess.models_dir / "fp32.onnx"
    run_checked(sess.model, sess.example_inputs, example_name)
    if sess.lm:
        export_lm_onnx(sess.model, fp32_path, quantized=False)
    else:
        export_float_onnx(sess.model, fp32_path, sess.example_inputs)
    value = _metric(sess.eval_fn(sess.predict(fp32_path)), "the FP32 baseline")
    size = fp32_path.stat().st_size
    sess.say(f"FP32 baseline: {sess.metric} {value:.4f}, {size} bytes")
    return {
        "metric": value,
        "metric_torch": _metric(sess.eval_fn(torch_predict(sess.model)), "the FP32 PyTorch model"),
        "size_bytes": size,
        **sess.speed(fp32_path),
        "onnx": str(fp32_path),
        "wall_s": time.perf_counter() - start,
    }


def _quantized_model(sess: _Session, run: Run) -> tuple[nn.Module, dict[str, Any]]:
    """The run's quantized model and what its method adds to its row."""
    if run.family == "qat":
        if sess.train is None:
            raise ValueError("a QAT run needs train_data (compare(..., train_data=...))")
        start = sess.ptq_models.get((run.method, run.recipe))
        return qat_model(
            sess.model, run, sess.calib, sess.train, progress=sess.progress, start=start
        )
    if run.family == "mixed":
        sess.say(f"{run.name}: per-layer sensitivity and bit allocation, then static PTQ")
        return mixed_model(sess.model, run, sess.calib, progress=sess.progress is not None)
    bars = sess.progress is not None
    qmodel = quantize(sess.model, run.recipe, sess.calib, method=run.method, progress=bars)
    if (run.method, run.recipe) in sess.qat_recipes and qat_start_as_is(run):
        sess.ptq_models[(run.method, run.recipe)] = qmodel
    return qmodel, {}


def _run_row(sess: _Session, run: Run, fp32_size: int) -> tuple[dict[str, Any], str | None]:
    """One run, quantized, exported, verified, scored and timed: (its row, its summary). A
    failure is recorded in the row, so one failing method does not take down the others."""
    sess.say(f"{run.name}: {run.family} {run.method}, recipe {run.recipe.name}")
    start = time.perf_counter()
    act_bits = run.recipe.activation.bits if run.recipe.activation else None
    row: dict[str, Any] = {
        "name": run.name,
        "family": run.family,
        "method": run.method,
        "recipe": run.recipe.name,
        "weight_bits": run.recipe.weight.bits if run.recipe.weight else None,
        "act_bits": 8 if run.method == "dynamic" else act_bits,
        "labels_used": run.labels_used or (run.family == "qat" and sess.has_labels),
    }
    summary = None
    try:
        qmodel, extra = _quantized_model(sess, run)
        row.update(extra)
        summary = cast(Summary, qmodel.quant_summary).format()
        path = sess.models_dir / f"{run.name}.onnx"
        sess.say(f"{run.name}: exporting to ONNX and verifying in ONNX Runtime")
        if sess.lm:
            lm_info = export_lm_onnx(qmodel, path, verify_windows=sess.verify_windows())
            size_bytes = lm_info.size_bytes
            row["top1_agreement"] = lm_info.agreement  # next-token agreement
            row["tokens_verified"] = lm_info.tokens_verified
        else:
            info = export_onnx(qmodel, path, sess.example_inputs, verify_data=sess.verify)
            size_bytes = info.size_bytes
            row["top1_agreement"] = info.verification.top1_agreement
            row["sqnr_db_vs_simulation"] = info.verification.sqnr_db
        row["metric_simulated"] = _metric(
            sess.eval_fn(torch_predict(qmodel)), f"{run.name} (simulated)"
        )
        row["metric_deployed"] = _metric(sess.eval_fn(sess.predict(path)), f"{run.name} (deployed)")
        row["size_bytes"] = size_bytes
        row["size_ratio"] = size_bytes / fp32_size
        row["samples_used"] = cast("dict[str, Any]", qmodel.quant_info)["samples_used"]
        if run.family == "qat":
            row["samples_used"] += sum(batch_len(b) for b in cast(list[Any], sess.train))
        sess.say(
            f"{run.name}: decode speed at batch 1 in ONNX Runtime"
            if sess.lm
            else f"{run.name}: latency in ONNX Runtime (batch sizes {sess.latency_batch_sizes})"
        )
        row.update(sess.speed(path))
        if (suffix := edge_format(run.recipe)) is not None:  # report/edge_runs.py
            sess.say(f"{run.name}: exporting for {run.recipe.target}, scoring in its runtime")
            edge = (sess.example_inputs, sess.verify, sess.eval_fn, sess.latency_runs, sess.threads)
            row["edge"] = edge_row(qmodel, path.with_suffix(suffix), *edge)
        row["onnx"] = str(path)
        row["status"] = "ok"
        sess.say(
            f"{run.name}: deployed {sess.metric} {row['metric_deployed']:.4f}, {size_bytes} bytes"
        )
    except Exception as err:  # isolate: one failing method must not take down the others
        row["status"] = "failed"
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=5)
        sess.say(f"{run.name}: FAILED ({row['error']})")
    row["wall_s"] = time.perf_counter() - start
    return row, summary


def compare(
    model: nn.Module,
    calib_data: Iterable[Any],
    eval_fn: EvalFn,
    example_inputs: Any = None,
    train_data: Iterable[Any] | None = None,
    recipes: Sequence[Recipe | str] | None = None,
    runs: Sequence[Run] | None = None,
    tolerance: float = 0.01,
    task: str = "model",
    metric: str = "accuracy",
    out_dir: str | Path | None = None,
    verify_data: Iterable[Any] | None = None,
    latency_batch_sizes: tuple[int, ...] = (1, 64),
    latency_runs: int = 20,
    threads: int = 2,
    progress: Callable[[str], None] | None = None,
    lower_is_better: bool | None = None,
) -> Report:
    """Run the baseline and each method; see the module docstring.

    eval_fn(predict) -> metric, where predict maps a batch of model inputs to the model's output
    tensor (the same function serves the PyTorch model and the ONNX Runtime session).
    recipes: presets or Recipes, one PTQ run each (see runs_for); runs: explicit Runs; neither:
    default_runs(), or default_lm_runs() for a causal LM (their QAT runs only when train_data
    is given). example_inputs: defaults to the
    first calibration batch. train_data: batches of inputs, or (inputs, labels) pairs, for QAT
    runs (labels_used is recorded from it); QAT runs without it are reported as failed.
    Exported models are written to out_dir/models (a temporary folder when out_dir is None).
    progress: called with a one-line message at each step; when given, the long steps
    (calibration, learned rounding, sensitivity analysis, QAT epochs) also show tqdm bars on
    stderr. None: silent. stderr_progress() gives the command line's.
    lower_is_better: the metric's direction; None: by its name (True for metrics.
    LOWER_IS_BETTER, "perplexity" among them). Higher is better: `tolerance` is the largest
    acceptable drop below FP32 (absolute, in [0, 1)); lower is better: the largest acceptable
    relative rise (0.03: at most 1.03x FP32) (report/direction.py).

    A LLaMA-style causal LM (a Hugging Face LlamaForCausalLM; ptq.weight_only.is_llama_style)
    is exported with export_lm_onnx (blocked low-bit weights as MatMulNBits, a KV cache),
    verified on verify_data's token windows (next-token agreement and perplexity); predict
    gives the logits (batch, tokens, vocabulary), each sequence run from an empty cache; speed is
    tokens per second decoding at batch 1 with the KV cache, with the peak memory
    (bench.decode_speed), and latency_ms["bs1"] is the time per decoded token.
    """
    if lower_is_better is None:
        lower_is_better = default_lower_is_better(metric)
    _check_compare_args(model, eval_fn, tolerance, progress, lower_is_better)
    chosen = _resolve_runs(recipes, runs, qat=train_data is not None, lm=is_llama_style(model))
    calib = batch_list(calib_data, "calib_data")
    if not calib:
        raise ValueError("calib_data is empty")
    example_name = "example_inputs"
    if example_inputs is None:
        example_inputs, example_name = calib[0], "calib_data[0] (the default example_inputs)"
    sess = _Session(
        # A copy: the caller's model keeps its training flags (STYLE §9).
        model=copy.deepcopy(model).eval(),
        eval_fn=eval_fn,
        example_inputs=example_inputs,
        calib=calib,
        verify=batch_list(verify_data, "verify_data") if verify_data is not None else calib[:2],
        train=batch_list(train_data, "train_data") if train_data is not None else None,
        models_dir=_models_dir(out_dir),
        latency_batch_sizes=latency_batch_sizes,
        latency_runs=latency_runs,
        threads=threads,
        metric=metric,
        progress=progress,
        lm=is_llama_style(model),
        qat_recipes=frozenset((r.method, r.recipe) for r in chosen if r.family == "qat"),
    )
    baseline = _baseline(sess, example_name)
    report = _run_all(sess, chosen, baseline, task, metric, tolerance, threads, lower_is_better)
    if out_dir is not None:
        sess.say(f"writing the report to {out_dir}")
        report.save(out_dir)
    return report


def _run_all(
    sess: _Session,
    chosen: Sequence[Run],
    baseline: dict[str, Any],
    task: str,
    metric: str,
    tolerance: float,
    threads: int,
    lower_is_better: bool,
) -> Report:
    """Each run's row (and its quantization summary) beside the baseline, and the
    recommendation."""
    results: list[dict[str, Any]] = []
    summaries: dict[str, str] = {}
    for run in chosen:
        row, summary = _run_row(sess, run, int(baseline["size_bytes"]))
        results.append(row)
        if summary is not None:
            summaries[run.name] = summary
    return Report(
        results={
            "task": task,
            "metric": metric,
            "tolerance": tolerance,
            "lower_is_better": lower_is_better,
            "tolerance_rule": tolerance_rule(tolerance, lower_is_better),
            "baseline": baseline,
            "runs": results,
            "recommendation": recommend(
                baseline["metric"],
                results,
                tolerance,
                cast(dict[str, float], baseline["latency_ms"]),
                lower_is_better=lower_is_better,
            ),
            "environment": _environment(threads),
        },
        summaries=summaries,
    )
