"""The `edgequant` command: parse, call the API, print. One small function pair per subcommand
(quantize and compare in their own modules)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from edgequant.bench import compare_latency, file_size_bytes, latency_ms
from edgequant.check import check
from edgequant.cli.common import (
    USAGE_ERROR,
    Command,
    UserError,
    check_out_folder,
    megabytes,
    print_error,
    text_table,
)
from edgequant.cli.compare import compare_arguments, compare_run
from edgequant.cli.quantize import quantize_arguments, quantize_run
from edgequant.config import load_config
from edgequant.export.check_onnx import check_onnx
from edgequant.export.edge_files import EDGE_SUFFIXES, edge_latency_ms, inspect_edge
from edgequant.export.inspect import inspect_onnx
from edgequant.report import demo

__all__ = ["COMMANDS", "main"]


# ---------------------------------------------------------------------------------------------
# inspect


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="the model to inspect: .onnx, .tflite or .pte"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _inspect_run(args: argparse.Namespace) -> int:
    edge = Path(args.model).suffix in EDGE_SUFFIXES
    report = inspect_edge(args.model) if edge else inspect_onnx(args.model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="the model to time: .onnx (ONNX Runtime), .tflite (LiteRT, its default XNNPACK "
        "path) or .pte (ExecuTorch), the last two at the file's own batch size",
    )
    parser.add_argument(
        "--vs", metavar="OTHER", help="time this model too, interleaved, and print OTHER/MODEL"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 64], metavar="N", help="default: 1 64"
    )
    parser.add_argument("--runs", type=int, default=30, help="timed runs per batch size (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")


def _bench_run(args: argparse.Namespace) -> int:
    if Path(args.model).suffix in EDGE_SUFFIXES or (
        args.vs and Path(args.vs).suffix in EDGE_SUFFIXES
    ):
        return _bench_edge(args)
    timing = (tuple(args.batch_sizes), args.warmup, args.runs, args.threads)
    size = file_size_bytes(args.model)
    rows: list[tuple[str, ...]]
    if args.vs is None:
        latency = latency_ms(args.model, *timing)
        rows = [("", "MODEL"), ("file", args.model), ("size", megabytes(size))]
        rows += [(f"latency {key}", f"{value:.3f} ms") for key, value in latency.items()]
    else:
        other_size = file_size_bytes(args.vs)
        result = compare_latency(args.model, args.vs, *timing)
        rows = [
            ("", "MODEL", "OTHER", "OTHER/MODEL"),
            ("file", args.model, args.vs, ""),
            ("size", megabytes(size), megabytes(other_size), f"{other_size / size:.3f}x"),
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
    print(text_table(rows))
    return 0


def _bench_edge(args: argparse.Namespace) -> int:
    """bench for .tflite / .pte files: each in its runtime at the file's own batch size; with
    --vs, each file is timed twice, in both orders, its better median kept, and OTHER/MODEL
    printed."""
    files = [args.model] + ([args.vs] if args.vs else [])
    for f in files:
        if Path(f).suffix not in EDGE_SUFFIXES:
            raise UserError(f"{f}: bench compares a .tflite or .pte file with another such file")
    timing = {"warmup": args.warmup, "runs": args.runs, "threads": args.threads}
    found = {f: edge_latency_ms(f, **timing) for f in files}
    if args.vs:  # a second pass in the other order: a slow spell falls on both
        for f in reversed(files):
            again = edge_latency_ms(f, **timing)
            found[f] = {k: min(v, again[k]) for k, v in found[f].items()}
    header = ("", "MODEL", "OTHER", "OTHER/MODEL")[: 2 if not args.vs else 4]
    rows: list[tuple[str, ...]] = [header, ("file", *files), ("size", *map(_size, files))]
    if args.vs:
        rows[1] += ("",)
        rows[2] += (f"{file_size_bytes(args.vs) / file_size_bytes(args.model):.3f}x",)
    for key, ms in found[args.model].items():
        other = found[args.vs].get(key) if args.vs else None
        row: tuple[str, ...] = (f"latency {key}", f"{ms:.3f} ms")
        if args.vs:
            row += (f"{other:.3f} ms", f"{other / ms:.3f}x") if other else ("-", "-")
        rows.append(row)
    print(
        "LiteRT (.tflite, its default XNNPACK path) / ExecuTorch (.pte), CPU, "
        f"{args.threads} threads; median of {args.runs} runs after {args.warmup} warm-up runs"
    )
    print(text_table(rows))
    return 0


def _size(path: str) -> str:
    return megabytes(file_size_bytes(path))


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
    if (args.model is None) == (args.config is None):
        raise UserError("give either MODEL.onnx or --config FILE.yaml")
    if args.config is not None:
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
    check_out_folder(args.out)
    report = demo.run_demo(args.out, quick=args.quick, quiet=args.quiet)
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
        quantize_arguments,
        quantize_run,
    ),
    "compare": Command(
        "quantize a model from a YAML config every way its recipes say, export and measure each "
        "in ONNX Runtime, recommend; writes report.html, report.md, results.json, plots",
        compare_arguments,
        compare_run,
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
        print_error(str(error) if error.filename is None else f"no such file: {error.filename}")
    except (UserError, ValueError) as error:
        print_error(str(error))
    except OSError as error:  # a file where a folder should be, no permission, a full disk
        where = f": {error.filename}" if error.filename is not None else ""
        print_error(f"{error.strerror or error}{where}")
    return USAGE_ERROR
