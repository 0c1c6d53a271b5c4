"""eq.compare: run the FP32 baseline and each quantization method, export each one, measure the
exported model in ONNX Runtime, and recommend the cheapest method that is good enough.

Every run is isolated: a method that fails is reported as failed and the others go on
(DESIGN §3, invariant 4). `metric_deployed` always comes from the exported model run in ONNX
Runtime, never from the simulation.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from edgequant.batches import call_model, metric_number
from edgequant.qat.selection import holdout_split
from edgequant.spec import Recipe
from edgequant.summary import Summary

# A predict function maps one batch of model inputs to the model's (first) output tensor.
Predict = Callable[[Any], torch.Tensor]
EvalFn = Callable[[Predict], float]


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


def _batch_len(batch: Any) -> int:
    from edgequant.batches import batch_size

    return batch_size(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _qat_model(
    model: nn.Module,
    run: Run,
    calib: list[Any],
    train_data: list[Any],
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prepare from the PTQ model, fine-tune with distillation from `model` on train_data less
    a held-out slice, and keep the epoch that fit_qat's selection picks on that slice."""
    from edgequant.qat import finalize, fit_qat, prepare_qat

    fit, held = holdout_split(train_data)
    bars = progress is not None
    # prepare_qat starts from the PTQ model at the same bits, its whole pipeline included
    # (learned rounding, bias correction).
    qmodel = prepare_qat(model, run.recipe, calib_data=calib, progress=bars)
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
    info = {
        "epochs": run.epochs,
        "kept_epoch": chosen["kept_epoch"],
        "selection": {
            "held_out_samples": chosen["held_out_predictions"],
            "trained_on_samples": sum(_batch_len(b) for b in fit),
            "against": chosen["against"],
            "heldout_top1": chosen["heldout_top1"],
            "rule": chosen["rule"],
            "why": chosen["why"],
        },
    }
    final = finalize(qmodel)
    for attr in ("quant_summary", "quant_info"):
        if hasattr(qmodel, attr) and not hasattr(final, attr):
            setattr(final, attr, getattr(qmodel, attr))
    return final, info


def _mixed_model(
    model: nn.Module, run: Run, calib: list[Any], progress: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    from edgequant.mixed import Budget, plan
    from edgequant.ptq import quantize

    assert run.budget_ratio is not None
    act = run.recipe.activation.bits if run.recipe.activation is not None else None
    p = plan(
        model,
        calib,
        Budget(size_ratio=run.budget_ratio),
        act_bits=act,
        recipe=run.recipe,
        num_samples=min(256, sum(_batch_len(b) for b in calib)),
        progress=progress,
    )
    qmodel = quantize(model, p.recipe, calib, method=run.method, progress=progress)
    return qmodel, {"mixed_bits": dict(p.bits), "packed_bytes": p.packed_bytes}


def runs_for(recipes: Sequence[Recipe | str]) -> list[Run]:
    """One PTQ run per recipe: weight-only recipes run method weight_only, the others static."""
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
    return runs


def stderr_progress(quiet: bool = False) -> Callable[[str], None] | None:
    """compare's `progress` for a command line: timestamped one-line messages on stderr (and,
    since it is not None, the steps' tqdm bars), or None when quiet (nothing at all)."""
    import sys

    if quiet:
        return None

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return say


def torch_predict(model: nn.Module) -> Predict:
    def predict(batch: Any) -> torch.Tensor:
        with torch.no_grad():
            out = call_model(model.eval(), batch)
        leaves, _ = torch.utils._pytree.tree_flatten(out)
        return leaves[0]

    return predict


def ort_predict(path: str | Path, threads: int = 2) -> Predict:
    """The exported model run in ONNX Runtime, as verification runs it (export.onnx.
    exact_session): on an x86 CPU without VNNI, a signed-activation target's INT8 weights run as
    the same grid in UINT8, since ONNX Runtime's u8s8 kernel saturates there and a device that
    runs the file (TFLite Micro, a VNNI CPU) would not."""
    import numpy as np
    import onnxruntime as ort

    from edgequant.export.onnx import exact_session, ort_feed

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess, _ = exact_session(path, opts)
    names = [i.name for i in sess.get_inputs()]

    def predict(batch: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(sess.run(None, ort_feed(names, batch))[0]))

    return predict


@dataclass
class Report:
    """What compare() measured; `results` has the keys of DESIGN §1's results file."""

    results: dict[str, Any]
    summaries: dict[str, str] = field(default_factory=dict)

    @property
    def recommendation(self) -> dict[str, Any]:
        return dict(self.results["recommendation"])

    def run(self, name: str) -> dict[str, Any]:
        for r in self.results["runs"]:
            if r["name"] == name:
                return dict(r)
        raise KeyError(f"no run named {name!r}; runs: {[r['name'] for r in self.results['runs']]}")

    def _check(self) -> None:
        """A ValueError naming the keys a results dict lacks (DESIGN §1's results file)."""
        if not isinstance(self.results, dict):
            raise TypeError(f"Report.results must be a dict, got {type(self.results).__name__}")
        missing = [k for k in RESULTS_KEYS if k not in self.results]
        if missing:
            raise ValueError(
                f"Report.results lacks the keys {missing} of a results file; it has "
                f"{sorted(self.results)}"
            )

    def to_markdown(self) -> str:
        from edgequant.report.render import markdown

        self._check()
        return markdown(self.results, self.summaries)

    def plots(self, out_dir: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
        """Draw each plot of report.plots.PLOTS as out_dir/<name>.png: (name -> path, name ->
        error). Plots are isolated like runs: one that fails is reported, the others are drawn."""
        from edgequant.report.plots import PLOTS

        folder = _folder(out_dir, "out_dir")
        folder.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        errors: dict[str, str] = {}
        for name, plot in PLOTS.items():
            try:
                path = plot(self.results, folder)
                if path is not None:  # None: nothing for this plot to show in these results
                    paths[name] = path
            except Exception as err:
                errors[name] = f"{type(err).__name__}: {err}"
                # A picture left by an earlier save would show other numbers than this report.
                (folder / f"{name}.png").unlink(missing_ok=True)
        return paths, errors

    def save(self, out_dir: str | Path) -> Path:
        """results.json, report.md, plots/*.png and report.html in out_dir, each written
        atomically; returns the folder. The measurements are written first, so a plot that
        fails (named in report.html and warned about) cannot lose them."""
        import warnings

        from edgequant._io import atomic_write_text
        from edgequant.report.render import html

        out = _folder(out_dir, "out_dir")
        _folder(out / "plots", "out_dir/plots")
        # Rendered before anything is written: results that cannot be rendered leave an
        # earlier report in out_dir whole, not a new results.json beside an old report.md.
        markdown = self.to_markdown()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(self.results, indent=1))
        atomic_write_text(out / "report.md", markdown)
        paths, errors = self.plots(out / "plots")
        for name, error in errors.items():
            warnings.warn(f"edgequant report: plot {name!r} not drawn: {error}", stacklevel=2)
        atomic_write_text(out / "report.html", html(self.results, self.summaries, paths, errors))
        return out


RESULTS_KEYS = ("task", "metric", "tolerance", "baseline", "runs", "recommendation")


def _folder(out_dir: str | Path, name: str) -> Path:
    """out_dir as a Path; a ValueError when it names an existing file, not a folder."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(out_dir).__name__}")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name} {str(folder)!r} is a file, not a folder")
    return folder


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


# An integer model counts as slower (or faster) than FP32 only beyond this ratio of their
# median latencies: on a shared 2-core machine, medians of the same file move by 5-10 %.
SPEED_MARGIN = 1.10


def _latency(row: Mapping[str, Any], key: str) -> float | None:
    value = (row.get("latency_ms") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _speed_note(
    pick: Mapping[str, Any], ok: list[dict[str, Any]], baseline_latency_ms: Mapping[str, float]
) -> tuple[str, dict[str, Any]]:
    """(sentence, facts) on the pick's speed against FP32 at each batch size both were timed
    at: says plainly where it is slower, why, and which model that meets the tolerance (FP32
    included) is the fastest there."""
    keys = sorted(
        (k for k in baseline_latency_ms if _latency(pick, k) is not None),
        key=lambda k: int(k[2:]) if k[2:].isdigit() else 1 << 30,
    )
    if not keys:
        return "", {}
    facts: dict[str, Any] = {"vs_fp32": {}, "fastest": {}}
    slower, faster, same = [], [], []
    for key in keys:
        fp32 = float(baseline_latency_ms[key])
        own = cast(float, _latency(pick, key))
        ratio = own / fp32 if fp32 > 0 else float("inf")
        facts["vs_fp32"][key] = ratio
        timed = [("fp32", fp32)] + [
            (r["name"], cast(float, _latency(r, key))) for r in ok if _latency(r, key) is not None
        ]
        facts["fastest"][key] = min(timed, key=lambda t: t[1])[0]
        text = f"batch {key[2:]}: {own:.3g} ms vs FP32 {fp32:.3g} ms"
        if ratio > SPEED_MARGIN:
            slower.append(f"{text} ({ratio:.1f}x)")
        elif ratio < 1 / SPEED_MARGIN:
            faster.append(f"{text} ({1 / ratio:.1f}x faster)")
        else:
            same.append(text)
    facts["slower_than_fp32"] = [k for k in keys if facts["vs_fp32"][k] > SPEED_MARGIN]
    parts = []
    if faster:
        parts.append(
            f"in ONNX Runtime on this machine it is faster than FP32 ({'; '.join(faster)})"
        )
    if same:
        parts.append(f"as fast as FP32 within timing noise ({'; '.join(same)})")
    if slower:
        winners = {k: facts["fastest"][k] for k in facts["slower_than_fp32"]}
        label = {name: "FP32" if name == "fp32" else name for name in winners.values()}
        if len(set(winners.values())) == 1:
            faster_choice = label[next(iter(winners.values()))]
        else:
            faster_choice = " and ".join(f"{label[n]} at batch {k[2:]}" for k, n in winners.items())
        parts.append(
            f"it is SLOWER than FP32 in ONNX Runtime on this machine ({'; '.join(slower)}): in a "
            "model this small the time goes to the QuantizeLinear/DequantizeLinear nodes and to "
            "per-kernel overhead, not to the multiply-adds that integer kernels speed up, so what "
            "the integer model buys here is its size, not speed; where speed is what matters, "
            f"the faster choice on this CPU is {faster_choice} (integer models pay off on larger "
            "layers, or on integer-only hardware such as the tflite-int8 and mcu-int8 targets)"
        )
    return "; ".join(parts), facts


def recommend(
    baseline_metric: float,
    runs: list[dict[str, Any]],
    tolerance: float,
    baseline_latency_ms: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The run to deploy: accuracy first, then size, then speed.

    Only runs whose deployed metric is within `tolerance` of the FP32 baseline qualify. Of
    those, the smallest file; at equal size, the cheaper to make (no labels before labels, PTQ
    before QAT), then the faster at the smallest batch size timed. With baseline_latency_ms
    (FP32's latency_ms), `why` also compares the pick's speed with FP32's and says plainly when
    it is slower and which model would be faster ("speed" holds the ratios).
    """
    ok = [
        r
        for r in runs
        if r.get("status") == "ok" and r["metric_deployed"] >= baseline_metric - tolerance
    ]
    if not ok:
        best = max(
            (r for r in runs if r.get("status") == "ok"),
            key=lambda r: r["metric_deployed"],
            default=None,
        )
        why = (
            f"no method came within {tolerance:.3f} of the FP32 baseline ({baseline_metric:.4f})"
            + (f"; the best was {best['name']} at {best['metric_deployed']:.4f}" if best else "")
        )
        return {"choice": None, "why": why, "within_tolerance": []}
    first_key = min(
        {k for r in ok for k in (r.get("latency_ms") or {})},
        key=lambda k: int(k[2:]) if k[2:].isdigit() else 1 << 30,
        default="bs1",
    )
    ok.sort(
        key=lambda r: (
            r["size_bytes"],
            bool(r["labels_used"]),
            r["family"] != "ptq",
            _latency(r, first_key) or float("inf"),
        )
    )
    pick = ok[0]
    why = (
        f"{pick['name']} deploys at {pick['metric_deployed']:.4f} in ONNX Runtime, within "
        f"{tolerance:.3f} of the FP32 baseline ({baseline_metric:.4f})"
        + ("; it needs no labels" if not pick["labels_used"] else "; it was trained with labels")
        + f", and its file is {pick['size_bytes']} bytes ({pick['size_ratio']:.2f}x FP32), the "
        f"smallest of the {len(ok)} methods within tolerance"
    )
    same_size = [r["name"] for r in ok[1:] if r["size_bytes"] == pick["size_bytes"]]
    if same_size:
        why += f" (tied with {', '.join(same_size)}: the cheaper to make, then the faster, wins)"
    result: dict[str, Any] = {
        "choice": pick["name"],
        "why": why,
        "within_tolerance": [r["name"] for r in ok],
    }
    if baseline_latency_ms:
        note, facts = _speed_note(pick, ok, baseline_latency_ms)
        if note:
            result["why"] += f". Speed: {note}"
            result["speed"] = facts
    return result


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
) -> Report:
    """Run the baseline and each method; see the module docstring.

    eval_fn(predict) -> metric, where predict maps a batch of model inputs to the model's output
    tensor (the same function serves the PyTorch model and the ONNX Runtime session).
    recipes: presets or Recipes, one PTQ run each (see runs_for); runs: explicit Runs; neither:
    default_runs() (its QAT runs only when train_data is given). example_inputs: defaults to the
    first calibration batch. train_data: batches of inputs, or (inputs, labels) pairs, for QAT
    runs (labels_used is recorded from it); QAT runs without it are reported as failed.
    Exported models are written to out_dir/models (a temporary folder when out_dir is None).
    progress: called with a one-line message at each step; when given, the long steps
    (calibration, learned rounding, sensitivity analysis, QAT epochs) also show tqdm bars on
    stderr. None: silent. stderr_progress() gives the command line's.
    """
    from edgequant.bench import latency_ms
    from edgequant.export.onnx import batch_list, export_float_onnx, export_onnx, run_checked
    from edgequant.ptq import quantize

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(eval_fn):
        raise TypeError(
            "eval_fn must be a callable taking a predict function and returning the metric"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if progress is not None and not callable(progress):
        raise TypeError(
            f"progress must be a callable taking a message (e.g. stderr_progress()) or None, "
            f"got {progress!r}"
        )
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
    runs = (
        runs_for(recipes)
        if recipes is not None
        else list(runs)
        if runs is not None
        else default_runs(qat=train_data is not None)
    )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    say = progress or (lambda msg: None)
    bars = progress is not None
    calib = batch_list(calib_data, "calib_data")
    if not calib:
        raise ValueError("calib_data is empty")
    example_name = "example_inputs"
    if example_inputs is None:
        example_inputs, example_name = calib[0], "calib_data[0] (the default example_inputs)"
    verify = batch_list(verify_data, "verify_data") if verify_data is not None else calib[:2]
    train = batch_list(train_data, "train_data") if train_data is not None else None
    has_labels = (
        train is not None
        and bool(train)
        and isinstance(train[0], (tuple, list))
        and len(train[0]) == 2
    )
    models_dir = (
        _folder(out_dir, "out_dir") / "models"
        if out_dir is not None
        else Path(tempfile.mkdtemp(prefix="edgequant-"))
    )
    models_dir.mkdir(parents=True, exist_ok=True)

    def latency(path: Path) -> dict[str, float]:
        return latency_ms(path, batch_sizes=latency_batch_sizes, runs=latency_runs, threads=threads)

    say("FP32 baseline: export and measure in ONNX Runtime")
    start = time.perf_counter()
    fp32_path = models_dir / "fp32.onnx"
    # A copy: the caller's model keeps its training flags (STYLE §9).
    model = copy.deepcopy(model).eval()
    run_checked(model, example_inputs, example_name)
    export_float_onnx(model, fp32_path, example_inputs)
    baseline_metric = _metric(eval_fn(ort_predict(fp32_path, threads)), "the FP32 baseline")
    fp32_size = fp32_path.stat().st_size
    baseline = {
        "metric": baseline_metric,
        "metric_torch": _metric(eval_fn(torch_predict(model)), "the FP32 PyTorch model"),
        "size_bytes": fp32_size,
        "latency_ms": latency(fp32_path),
        "onnx": str(fp32_path),
        "wall_s": time.perf_counter() - start,
    }
    say(f"FP32 baseline: {metric} {baseline_metric:.4f}, {fp32_size} bytes")

    results: list[dict[str, Any]] = []
    summaries: dict[str, str] = {}
    for run in runs:
        say(f"{run.name}: {run.family} {run.method}, recipe {run.recipe.name}")
        start = time.perf_counter()
        row: dict[str, Any] = {
            "name": run.name,
            "family": run.family,
            "method": run.method,
            "recipe": run.recipe.name,
            "weight_bits": run.recipe.weight.bits if run.recipe.weight else None,
            "act_bits": (
                8
                if run.method == "dynamic"
                else run.recipe.activation.bits
                if run.recipe.activation
                else None
            ),
            "labels_used": run.labels_used or (run.family == "qat" and has_labels),
        }
        try:
            extra: dict[str, Any] = {}
            if run.family == "qat":
                if train is None:
                    raise ValueError("a QAT run needs train_data (compare(..., train_data=...))")
                qmodel, extra = _qat_model(model, run, calib, train, progress=progress)
            elif run.family == "mixed":
                say(f"{run.name}: per-layer sensitivity and bit allocation, then static PTQ")
                qmodel, extra = _mixed_model(model, run, calib, progress=bars)
            else:
                qmodel = quantize(model, run.recipe, calib, method=run.method, progress=bars)
            row.update(extra)
            summaries[run.name] = cast(Summary, qmodel.quant_summary).format()
            path = models_dir / f"{run.name}.onnx"
            say(f"{run.name}: exporting to ONNX and verifying in ONNX Runtime")
            info = export_onnx(qmodel, path, example_inputs, verify_data=verify)
            row["metric_simulated"] = _metric(
                eval_fn(torch_predict(qmodel)), f"{run.name} (simulated)"
            )
            row["metric_deployed"] = _metric(
                eval_fn(ort_predict(path, threads)), f"{run.name} (deployed)"
            )
            row["top1_agreement"] = info.verification.top1_agreement
            row["sqnr_db_vs_simulation"] = info.verification.sqnr_db
            row["size_bytes"] = info.size_bytes
            row["size_ratio"] = info.size_bytes / fp32_size
            row["samples_used"] = cast("dict[str, Any]", qmodel.quant_info)["samples_used"]
            if run.family == "qat":
                row["samples_used"] += sum(_batch_len(b) for b in cast(list[Any], train))
            say(f"{run.name}: latency in ONNX Runtime (batch sizes {latency_batch_sizes})")
            row["latency_ms"] = latency(path)
            row["onnx"] = str(path)
            row["status"] = "ok"
            say(
                f"{run.name}: deployed {metric} {row['metric_deployed']:.4f}, {info.size_bytes} bytes"
            )
        except Exception as err:  # isolate: one failing method must not take down the others
            row["status"] = "failed"
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc(limit=5)
            say(f"{run.name}: FAILED ({row['error']})")
        row["wall_s"] = time.perf_counter() - start
        results.append(row)

    report = Report(
        results={
            "task": task,
            "metric": metric,
            "tolerance": tolerance,
            "baseline": baseline,
            "runs": results,
            "recommendation": recommend(
                baseline_metric, results, tolerance, cast(dict[str, float], baseline["latency_ms"])
            ),
            "environment": _environment(threads),
        },
        summaries=summaries,
    )
    if out_dir is not None:
        say(f"writing the report to {out_dir}")
        report.save(out_dir)
    return report
