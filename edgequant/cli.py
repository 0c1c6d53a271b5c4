"""The `edgequant` command: parse, call the API, print. One small function pair per subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["COMMANDS", "main"]

# Exit status for a user error (missing file, not an ONNX model, bad argument): argparse's too.
USAGE_ERROR = 2


class UserError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------
# inspect


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to inspect")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _inspect_run(args: argparse.Namespace) -> int:
    from edgequant.export.inspect import inspect_onnx

    report = inspect_onnx(args.model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to time")
    parser.add_argument(
        "--vs", metavar="OTHER.onnx", help="time this model too, interleaved, and print OTHER/MODEL"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 64], metavar="N", help="default: 1 64"
    )
    parser.add_argument("--runs", type=int, default=30, help="timed runs per batch size (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")


def _bench_run(args: argparse.Namespace) -> int:
    from edgequant.bench import compare_latency, file_size_bytes, latency_ms

    timing = (tuple(args.batch_sizes), args.warmup, args.runs, args.threads)
    size = file_size_bytes(args.model)
    rows: list[tuple[str, ...]]
    if args.vs is None:
        latency = latency_ms(args.model, *timing)
        rows = [("", "MODEL"), ("file", args.model), ("size", _megabytes(size))]
        rows += [(f"latency {key}", f"{value:.3f} ms") for key, value in latency.items()]
    else:
        other_size = file_size_bytes(args.vs)
        result = compare_latency(args.model, args.vs, *timing)
        rows = [
            ("", "MODEL", "OTHER", "OTHER/MODEL"),
            ("file", args.model, args.vs, ""),
            ("size", _megabytes(size), _megabytes(other_size), f"{other_size / size:.3f}x"),
        ]
        for key in result["a"]:
            rows.append(
                (
                    f"latency {key}",
                    f"{result['a'][key]:.3f} ms",
                    f"{result['b'][key]:.3f} ms",
                    f"{result['ratio'][key]:.3f}x",
                )
            )
    print(
        f"ONNX Runtime, CPU, {args.threads} threads; median of {args.runs} runs "
        f"after {args.warmup} warm-up runs"
    )
    print(_table(rows))
    return 0


# ---------------------------------------------------------------------------------------------
# quantize


def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE.yaml", help="the model and data")
    parser.add_argument(
        "--recipe",
        metavar="NAME",
        help="a preset (w8a8, w4a8, w4a4, w4-weight-only, ...) or a recipe named in the config; "
        "default: the config's first recipe, else w8a8",
    )
    parser.add_argument(
        "--method", default="static", help="static (default), dynamic or weight_only"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="MODEL.onnx",
        help="the file to write; its suffix picks the format: .onnx (ONNX Runtime), .tflite "
        "(LiteRT and TFLite Micro: a fully integer target such as mcu-int8) or .pte (ExecuTorch)",
    )
    parser.add_argument(
        "--num-samples", type=int, metavar="N", help="calibration samples (default: the config's)"
    )
    parser.add_argument(
        "--weight-storage",
        default="exact",
        metavar="HOW",
        help="exact (default: 8-bit weights beside uint8 activations stored as UINT8 + 128, exact "
        "in ONNX Runtime on every CPU) or int8 (ONNX Runtime's faster u8s8 kernel, exact only on "
        "CPUs with VNNI or Arm dot-product instructions; verification runs on this machine)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars; print only the line about the written file",
    )


def _quantize_run(args: argparse.Namespace) -> int:
    from pathlib import Path
    from typing import Any

    import edgequant as eq
    from edgequant.config import load_config
    from edgequant.ptq.quantize import METHODS

    # Everything that can be checked before the slow part is checked first.
    config = load_config(args.config)
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; valid: {', '.join(METHODS)}")
    from edgequant.export.lower import WEIGHT_STORAGE

    if args.weight_storage not in WEIGHT_STORAGE:
        raise UserError(
            f"unknown --weight-storage {args.weight_storage!r}; valid: {', '.join(WEIGHT_STORAGE)}"
        )
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be a positive integer, got {args.num_samples}")
    out = Path(args.out)
    if out.suffix not in (".onnx", ".tflite", ".pte"):
        raise UserError(f"--out must end in .onnx, .tflite or .pte, got {args.out!r}")
    if not out.parent.is_dir():
        raise UserError(f"--out: the folder {str(out.parent)!r} does not exist")
    recipe = config.recipe(args.recipe)
    if out.suffix == ".tflite":
        from edgequant.spec import TARGETS

        if not TARGETS[recipe.target].fully_integer:
            raise UserError(
                f"--out {args.out!r}: a .tflite is fully integer, and recipe {recipe.name!r} has "
                f"target {recipe.target!r}; use a fully integer target (target: mcu-int8)"
            )

    model = config.build_model()
    qmodel = eq.quantize(
        model,
        recipe,
        calib_data=config.calib_batches(),
        method=args.method,
        num_samples=args.num_samples or config.num_samples,
        progress=not args.quiet,  # bars on stderr: calibration, learned rounding
    )
    eval_batches = list(config.eval_batches()) if config.eval_data is not None else None
    if not args.quiet:
        # Attributes eq.quantize sets on the model it returns (nn.Module's typing cannot see them).
        summary: Any = qmodel.quant_summary
        info: Any = qmodel.quant_info
        print(summary.format())
        print(f"calibrated on {info['samples_used']} samples in {info['wall_s']:.2f} s")
        if eval_batches is not None:
            metric = config.metric if isinstance(config.metric, str) else str(config.metric)
            before = config.evaluate(model, eval_batches)
            after = config.evaluate(qmodel, eval_batches)
            print(f"{metric} on eval_data: float {before:.4f}, quantized (simulated) {after:.4f}")
    # With eval data, verification covers the task's own inputs, not only one example batch.
    verify = [inputs for inputs, _ in eval_batches] if eval_batches is not None else None
    try:
        export: Any
        if out.suffix == ".tflite":
            export = eq.export_tflite(qmodel, out, config.example_inputs(), verify_data=verify)
        elif out.suffix == ".pte":
            export = eq.export_executorch(qmodel, out, config.example_inputs(), verify_data=verify)
        else:
            export = eq.export_onnx(
                qmodel,
                out,
                config.example_inputs(),
                verify_data=verify,
                weight_storage=args.weight_storage,
            )
    except eq.ExportError as error:
        raise UserError(f"export failed: {error}") from error
    print(export)
    return 0


# ---------------------------------------------------------------------------------------------
# compare


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
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


def _compare_run(args: argparse.Namespace) -> int:
    """Each recipe of the config is one PTQ run: a weight-only recipe (no activation spec) runs
    method weight_only, any other static (calibrated activations). A config without recipes
    runs compare's default set (PTQ, a mixed-precision plan, and QAT when the config has
    train_data). The metric is the config's, on its eval_data."""
    from pathlib import Path
    from typing import Any

    import torch

    from edgequant.config import load_config
    from edgequant.report.compare import (
        Predict,
        Run,
        compare,
        default_runs,
        runs_for,
        stderr_progress,
    )
    from edgequant.report.render import table
    from edgequant.spec import Recipe

    # Everything that can be checked before the slow part is checked first.
    config = load_config(args.config)
    if config.eval_data is None:
        raise config.error(
            "eval_data", "compare measures the metric on it; add it ((inputs, labels) batches)"
        )
    out = Path(args.out)
    _check_out_folder(args.out)

    def for_run(recipe: Recipe) -> Recipe:
        samples = config.num_samples or recipe.calib_samples
        if args.quick:
            samples = min(samples, args.quick_calib_samples)
        return recipe.replace(calib_samples=samples)

    import dataclasses

    if config.recipes:
        runs = [Run(run.name, run.method, for_run(run.recipe)) for run in runs_for(config.recipes)]
    else:
        # The default set: its QAT runs when the config has train_data.
        runs = [
            dataclasses.replace(run, recipe=for_run(run.recipe.for_target(config.target)))
            for run in default_runs(qat=config.train_data is not None)
        ]

    progress = stderr_progress(args.quiet)
    say = progress or (lambda message: None)

    say(f"{config.task}: building the model and loading the data")
    model = config.build_model()
    calib = list(config.calib_batches())
    pairs: list[Any] = list(config.eval_batches())
    for item in pairs:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise config.error(
                "eval_data",
                f"{config.eval_data} must yield (inputs, labels) pairs, got {type(item).__name__}",
            )
    metric_fn = config.metric_fn()

    def eval_fn(predict: Predict) -> float:
        outputs = torch.cat([torch.as_tensor(predict(inputs)) for inputs, _ in pairs])
        labels = torch.cat([torch.as_tensor(labels) for _, labels in pairs])
        return float(metric_fn(outputs, labels))

    report = compare(
        model,
        calib,
        eval_fn,
        config.example_inputs(),
        train_data=config.train_batches() if config.train_data is not None else None,
        runs=runs,
        tolerance=config.tolerance,
        task=config.task,
        metric=config.metric if isinstance(config.metric, str) else config.metric.function,
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


# ---------------------------------------------------------------------------------------------
# check


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", metavar="MODEL.onnx", help="an ONNX model (or give --config)"
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="the PyTorch model of a config")
    parser.add_argument(
        "--target", metavar="NAME", help="the hardware target (default: the config's)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _check_run(args: argparse.Namespace) -> int:
    """Exit status 0 when the model can go to the target as it is, 1 when it must change."""
    from edgequant.check import check
    from edgequant.export.check_onnx import check_onnx

    if (args.model is None) == (args.config is None):
        raise UserError("give either MODEL.onnx or --config FILE.yaml")
    if args.config is not None:
        from edgequant.config import load_config

        config = load_config(args.config)
        result = check(config.build_model(), args.target or config.target, config.example_inputs())
    else:
        if args.target is None:
            raise UserError("--target is needed with an ONNX model")
        result = check_onnx(args.model, args.target)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 0 if result.ok else 1


# ---------------------------------------------------------------------------------------------
# demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="runs/demo", help="folder for results.json, report.md, models/"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer epochs and samples (about 30 s)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the recommendation")


def _demo_run(args: argparse.Namespace) -> int:
    from edgequant.report.demo import run_demo

    _check_out_folder(args.out)
    report = run_demo(args.out, quick=args.quick, quiet=args.quiet)
    if args.quiet:
        rec = report.recommendation
        print(f"recommendation: {rec['choice']}: {rec['why']}")
    return 0


# ---------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "inspect": Command(
        "per-layer bits, scales and size of an ONNX model; is it really integer?",
        _inspect_arguments,
        _inspect_run,
    ),
    "bench": Command(
        "latency of an ONNX model in ONNX Runtime, optionally side by side with another",
        _bench_arguments,
        _bench_run,
    ),
    "quantize": Command(
        "quantize a model from a YAML config, export it as integer ONNX, verify it in ONNX Runtime",
        _quantize_arguments,
        _quantize_run,
    ),
    "compare": Command(
        "quantize a model from a YAML config every way its recipes say, export and measure each "
        "in ONNX Runtime, recommend; writes report.html, report.md, results.json, plots",
        _compare_arguments,
        _compare_run,
    ),
    "check": Command(
        "before calibration: which ops a target cannot run in integer, and what to do about each",
        _check_arguments,
        _check_run,
    ),
    "demo": Command(
        "the main job on built-in MNIST-1D data: train, quantize every way, export, measure, recommend",
        _demo_arguments,
        _demo_run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgequant",
        description="Quantize PyTorch models, export integer ONNX, inspect and benchmark it.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the edgequant command; returns the exit status (2 for user errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else USAGE_ERROR
    try:
        return int(args.run(args))
    except FileNotFoundError as error:
        # The OS's own message ("[Errno 2] No such file or directory: 'x'") names the file too.
        _error(str(error) if error.filename is None else f"no such file: {error.filename}")
    except (UserError, ValueError) as error:
        _error(str(error))
    except OSError as error:  # a file where a folder should be, no permission, a full disk
        where = f": {error.filename}" if error.filename is not None else ""
        _error(f"{error.strerror or error}{where}")
    return USAGE_ERROR


def _check_out_folder(out: str) -> None:
    """--out names a folder to create or fill: refused before any work when it, or a folder it
    would be created in, is a file (the report's mkdir came after minutes of quantizing)."""
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out: {out!r} exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out: {out!r} cannot be created: {str(parent)!r} is a file")
            break


def _error(message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"edgequant: error: {first_line}", file=sys.stderr)


def _megabytes(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.3f} MB" if size_bytes >= 100_000 else f"{size_bytes / 1e3:.1f} kB"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


if __name__ == "__main__":
    sys.exit(main())
