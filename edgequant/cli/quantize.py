"""`edgequant quantize`: quantize a model from a YAML config, export it, verify it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import edgequant as eq
from edgequant.cli.common import UserError
from edgequant.config import load_config
from edgequant.export.lower import WEIGHT_STORAGE
from edgequant.ptq.quantize import METHODS
from edgequant.targets import TARGETS


def quantize_arguments(parser: argparse.ArgumentParser) -> None:
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
        default="auto",
        metavar="HOW",
        help="auto (default: int8 where this machine's CPU runs it exactly, else exact), exact "
        "(8-bit weights beside uint8 activations stored as UINT8 + 128, exact in ONNX Runtime on "
        "every CPU) or int8 (ONNX Runtime's faster u8s8 kernel, exact only on CPUs with VNNI or "
        "Arm dot-product instructions; verification runs on this machine)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars; print only the line about the written file",
    )


def quantize_run(args: argparse.Namespace) -> int:
    # Everything that can be checked before the slow part is checked first.
    config = load_config(args.config)
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; valid: {', '.join(METHODS)}")

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
    if out.suffix == ".tflite" and not TARGETS[recipe.target].fully_integer:
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
