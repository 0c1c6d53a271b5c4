"""`edgequant compare`: quantize a model from a YAML config every way its recipes say, export and
measure each, recommend; the report's files."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgequant.cli.common import check_out_folder
from edgequant.config import load_config
from edgequant.config.schema import BATCHED_METRICS
from edgequant.ptq.weight_only import is_llama_style
from edgequant.recipe import Recipe
from edgequant.report import compare as report_compare
from edgequant.report.compare import Run, default_runs, runs_for, stderr_progress
from edgequant.report.render import table
from edgequant.report.runs import default_lm_runs

if TYPE_CHECKING:
    from edgequant.config import Config
    from edgequant.report.compare import Predict


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    # --quick: calibrate on at most this many samples, time this many runs per batch size (20
    # without it); set here so that the help and the run read the same numbers.
    parser.set_defaults(quick_calib_samples=128, quick_latency_runs=5)
    quick = parser.get_default("quick_calib_samples"), parser.get_default("quick_latency_runs")
    parser.add_argument(
        "--config", required=True, metavar="FILE.yaml", help="the model, data, metric, recipes"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for results.json, report.md, report.html, plots/ and models/",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"calibrate on at most {quick[0]} samples and time {quick[1]} runs per batch size "
        "instead of 20 (the metric still uses all of eval_data)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress; print only the recommendation"
    )


def compare_run(args: argparse.Namespace) -> int:
    """Each recipe of the config is one PTQ run: a weight-only recipe (no activation spec) runs
    method weight_only, any other static (calibrated activations); with qat_epochs (and
    train_data), also one QAT run from that PTQ start. A config without recipes
    runs compare's default set (PTQ, a mixed-precision plan, and QAT when the config has
    train_data; for a causal LM, report.runs.default_lm_runs). The metric is the config's, on its eval_data."""
    # Everything that can be checked before the slow part is checked first.
    config = load_config(args.config)
    if config.eval_data is None:
        raise config.error(
            "eval_data", "compare measures the metric on it; add it ((inputs, labels) batches)"
        )
    out = Path(args.out)
    check_out_folder(args.out)

    runs = _compare_runs(config, args) if config.recipes else None
    progress = stderr_progress(args.quiet)
    say = progress or (lambda message: None)

    say(f"{config.task}: building the model and loading the data")
    model = config.build_model()
    if runs is None:  # the default set depends on the model (a causal LM's is weight-only)
        runs = _compare_runs(config, args, lm=is_llama_style(model))
    calib = list(config.calib_batches())
    pairs, eval_fn = _eval_pairs(config)
    report = report_compare.compare(
        model,
        calib,
        eval_fn,
        config.example_inputs(),
        train_data=config.train_batches() if config.train_data is not None else None,
        runs=runs,
        tolerance=config.tolerance,
        task=config.task,
        metric=config.metric_name,
        lower_is_better=config.lower_is_better_metric,
        out_dir=out,
        verify_data=[inputs for inputs, _ in pairs],
        latency_runs=args.quick_latency_runs if args.quick else 20,
        progress=progress,
    )
    rec = report.recommendation
    if args.quiet:
        print(f"recommendation: {rec['choice']}: {rec['why']}")
        return 0
    print(table(report.results))
    print(f"\nRecommendation: {rec['choice'] or 'none of the methods tried'}. {rec['why']}.")
    print(f"Report: {out / 'report.html'} (and report.md, results.json, plots/, models/)")
    return 0


def _compare_runs(config: Config, args: argparse.Namespace, lm: bool = False) -> list[Run]:
    """The config's recipes as runs (or compare's default set, its QAT when the config has
    train_data), each calibrated on the config's num_samples (capped under --quick)."""

    def for_run(recipe: Recipe) -> Recipe:
        samples = config.num_samples or recipe.calib_samples
        if args.quick:
            samples = min(samples, args.quick_calib_samples)
        return recipe.replace(calib_samples=samples)

    if config.recipes:
        return [
            dataclasses.replace(run, recipe=for_run(run.recipe))
            for run in runs_for(config.recipes, qat_epochs=config.qat_epochs)
        ]
    qat = config.train_data is not None
    defaults = default_lm_runs(qat=qat) if lm else default_runs(qat=qat)
    return [
        dataclasses.replace(run, recipe=for_run(run.recipe.for_target(config.target)))
        for run in defaults
    ]


def _eval_pairs(config: Config) -> tuple[list[Any], Callable[[Predict], float]]:
    """The config's eval_data as (inputs, labels) pairs, and eval_fn(predict): the config's
    metric of predict's outputs on them."""
    pairs: list[Any] = list(config.eval_batches())
    for item in pairs:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise config.error(
                "eval_data",
                f"{config.eval_data} must yield (inputs, labels) pairs, got {type(item).__name__}",
            )
    metric_fn = config.metric_fn()
    batched = BATCHED_METRICS.get(config.metric) if isinstance(config.metric, str) else None

    def eval_fn(predict: Predict) -> float:
        if batched is not None:  # batch by batch: a language model's logits are large
            partial, finish = batched
            sums = [partial(torch.as_tensor(predict(x)), torch.as_tensor(y)) for x, y in pairs]
            return float(finish(sum(t for t, _ in sums) / max(sum(n for _, n in sums), 1)))
        outputs = torch.cat([torch.as_tensor(predict(inputs)) for inputs, _ in pairs])
        labels = torch.cat([torch.as_tensor(labels) for _, labels in pairs])
        return float(metric_fn(outputs, labels))

    return pairs, eval_fn
