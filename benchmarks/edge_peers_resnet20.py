"""ResNet-20 W8A8 and W4A8 in LiteRT: eq.export_tflite beside litert-torch's own PT2E quantizer flow.

Both from the pretrained ResNet-20 of ../shared with the same 512 calibration images of
train_4660, both converted by litert-torch 0.10 to a .tflite, both run in the same LiteRT
interpreter on the same images. Ours: `eq.quantize(model, Recipe.preset(p).for_target("mcu-int8"))`
(p = w8a8, w4a8) then `eq.export_tflite` (verified on its example input only here;
benchmarks/edge_resnet20.py verifies all of test_932). The peer: `PT2EQuantizer().set_global(
get_symmetric_quantization_config(is_per_channel=True))`, `prepare_pt2e`, calibration,
`convert_pt2e`, `litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=quantizer))`,
as litert-torch's own tests do it; at W4A8 the same config with its weight QuantizationSpec
narrowed to [-7, 7] (litert-torch has no 4-bit preset; the grid is our w4a8 preset's).
Reported: accuracy in LiteRT's default (XNNPACK) path on test_932 and on the 10,000 JPEG images,
whether each file is fully integer, flash and TFLite Micro arena, and batch-1 latency of all
four files, interleaved.

    OMP_NUM_THREADS=1 flock /tmp/edgequant-bench.lock python benchmarks/edge_peers_resnet20.py \
        [--out benchmarks/results/edge_peers_resnet20.json] [--quick]
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _resnet20 import (  # benchmarks/_resnet20.py
    batch1_median_ms,
    best_latency_ms,
    edge_results,
    eval_sets,
    load_resnet20_cifar,
    peer_bars,
    predictions,
    resnet20_parser,
)
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.export.tflite_runtime import TFLiteRunner, tensor_ops, tflm_arena_bytes
from edgequant.recipe import Recipe


def peer_tflite(
    model: torch.nn.Module, calib: torch.Tensor, example: torch.Tensor, bits: int = 8
) -> bytes:
    """litert-torch's PT2E flow: static, per-channel symmetric `bits`-bit weights (narrow range,
    in int8 containers), int8 activations."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    if bits != 8:
        qmax = 2 ** (bits - 1) - 1
        weight = dataclasses.replace(config.weight, quant_min=-qmax, quant_max=qmax)
        config = dataclasses.replace(config, weight=weight)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(config)
    graph = torch.export.export(model.eval(), (example,)).module()
    prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(calib.shape[0]):  # the exported graph has batch size 1
            prepared(calib[i : i + 1])
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    edge = litert_torch.convert(
        converted, (example,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)
    )
    return bytes(edge.model_content())


PRESETS = ("w8a8", "w4a8")
PEER = "litert-torch pt2e"


def latency_ms(runner: TFLiteRunner, x: np.ndarray) -> float:
    """Median batch-1 latency of runner on one image (after 20 warm-up runs)."""
    sample = [x[:1]]
    return batch1_median_ms(lambda: runner.run_int(sample))


def describe(blob: bytes, wall_s: float, sets: dict) -> tuple[dict, TFLiteRunner]:
    """A .tflite's row (flash, TFLite Micro arena, integer or not, LiteRT accuracy) and runner."""
    ops, floats = tensor_ops(blob)
    runner = TFLiteRunner(blob, "litert")
    row: dict = {
        "flash_bytes": len(blob),
        "fully_integer": not floats,
        "float_ops": floats[:10],
        "ops": ops,
        "quantize_and_convert_wall_s": wall_s,
    }
    try:
        row["tflm_arena_bytes"] = tflm_arena_bytes(blob)
    except eq.ExportError as err:
        row["tflm_arena_bytes"] = None
        row["tflm_error"] = str(err)[:300]
    for set_name, (x, y) in sets.items():
        row[f"litert_acc_{set_name}"] = float((predictions(runner, x) == y).mean())
    return row, runner


def main() -> int:
    args = resnet20_parser(__doc__, "benchmarks/results/edge_peers_resnet20.json").parse_args()
    if cifar_missing():
        return 0
    data = load_resnet20_cifar()
    model, x_cal, x932 = data.model, data.x_cal, data.x932
    sets = eval_sets(data, args.quick)
    work = Path(tempfile.mkdtemp(prefix="eq-edge-peers-"))

    rows: dict[str, dict] = {}
    runners: dict[str, TFLiteRunner] = {}
    for preset in PRESETS:
        start = time.perf_counter()
        recipe = Recipe.preset(preset).for_target("mcu-int8")
        qmodel = eq.quantize(model, recipe, data.calib, "static")
        info = eq.export_tflite(qmodel, work / f"ours_{preset}.tflite", x932[:1])
        print(info, flush=True)
        files = {f"edgequant {preset}": (work / f"ours_{preset}.tflite").read_bytes()}
        wall = {f"edgequant {preset}": time.perf_counter() - start}
        start = time.perf_counter()
        files[f"{PEER} {preset}"] = peer_tflite(model, x_cal, x932[:1], int(preset[1]))
        wall[f"{PEER} {preset}"] = time.perf_counter() - start
        for name, blob in files.items():
            rows[name], runners[name] = describe(blob, wall[name], sets)
            print(name, json.dumps({k: v for k, v in rows[name].items() if k != "ops"}), flush=True)
    for name, best in best_latency_ms(runners, latency_ms, x932.numpy()).items():
        rows[name]["litert_latency_ms_bs1"] = best
    bars: dict[str, bool] = {}
    speeds: dict[str, float] = {}
    for preset in PRESETS:
        ours, peer = rows[f"edgequant {preset}"], rows[f"{PEER} {preset}"]
        preset_bars, speeds[preset] = peer_bars(preset, ours, peer, "litert")
        bars.update(preset_bars)
    out = edge_results(
        "edge_peers_resnet20", args.quick, rows, bars, threads=1, speed_ours_vs_peer=speeds
    )
    write_json(args.out, out)
    print(json.dumps(bars, indent=1), json.dumps(speeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
