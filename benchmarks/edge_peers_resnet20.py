"""ResNet-20 W8A8 in LiteRT: eq.export_tflite beside litert-torch's own PT2E quantizer flow.

Both from the pretrained ResNet-20 of ../shared with the same 512 calibration images of
train_4660, both converted by litert-torch 0.10 to a .tflite, both run in the same LiteRT
interpreter on the same images. Ours: `eq.quantize(model, w8a8 for mcu-int8)` then
`eq.export_tflite` (verified on its example input only here; benchmarks/edge_resnet20.py verifies
all of test_932). The peer: `PT2EQuantizer().set_global(get_symmetric_quantization_config(
is_per_channel=True))`, `prepare_pt2e`, calibration, `convert_pt2e`, `litert_torch.convert(...,
quant_config=QuantConfig(pt2e_quantizer=quantizer))`, as litert-torch's own tests do it.
Reported: accuracy in LiteRT's default (XNNPACK) path on test_932 and on the 10,000 JPEG images,
whether each file is fully integer, flash and TFLite Micro arena, and batch-1 latency of each
against the other, interleaved.

    flock /tmp/edgequant-bench.lock python benchmarks/edge_peers_resnet20.py \
        [--out benchmarks/results/edge_peers_resnet20.json] [--quick]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from _resnet20 import eval_sets, load_resnet20_cifar, resnet20_parser  # benchmarks/_resnet20.py
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)
from edge_resnet20 import latency_ms, predictions

import edgequant as eq
from edgequant.export.tflite_runtime import TFLiteRunner, tensor_ops, tflm_arena_bytes
from edgequant.recipe import Recipe


def peer_tflite(model: torch.nn.Module, calib: torch.Tensor, example: torch.Tensor) -> bytes:
    """litert-torch's PT2E flow: static W8A8, per-channel symmetric weights."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    )
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


def main() -> int:
    args = resnet20_parser(__doc__, "benchmarks/results/edge_peers_resnet20.json").parse_args()
    if cifar_missing():
        return 0
    data = load_resnet20_cifar()
    model, x_cal, x932 = data.model, data.x_cal, data.x932
    sets = eval_sets(data, args.quick)
    work = Path(tempfile.mkdtemp(prefix="eq-edge-peers-"))

    start = time.perf_counter()
    qmodel = eq.quantize(model, Recipe.preset("w8a8").for_target("mcu-int8"), data.calib, "static")
    info = eq.export_tflite(qmodel, work / "ours.tflite", x932[:1])
    files = {"edgequant": (work / "ours.tflite").read_bytes()}
    wall = {"edgequant": time.perf_counter() - start}
    start = time.perf_counter()
    files["litert-torch pt2e"] = peer_tflite(model, x_cal, x932[:1])
    wall["litert-torch pt2e"] = time.perf_counter() - start
    print(info, flush=True)

    rows: dict[str, dict] = {}
    runners = {}
    for name, data in files.items():
        ops, floats = tensor_ops(data)
        runner = TFLiteRunner(data, "litert")
        runners[name] = runner
        row: dict = {
            "flash_bytes": len(data),
            "fully_integer": not floats,
            "float_ops": floats[:10],
            "ops": ops,
            "quantize_and_convert_wall_s": wall[name],
        }
        try:
            row["tflm_arena_bytes"] = tflm_arena_bytes(data)
        except eq.ExportError as err:
            row["tflm_arena_bytes"] = None
            row["tflm_error"] = str(err)[:300]
        for set_name, (x, y) in sets.items():
            row[f"litert_acc_{set_name}"] = float((predictions(runner, x) == y).mean())
        rows[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "ops"}), flush=True)
    x = x932.numpy()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(3):  # interleaved, so both see the same machine load
        for name, runner in runners.items():
            times[name].append(latency_ms(runner, x))
    for name in runners:
        rows[name]["litert_latency_ms_bs1"] = min(times[name])
    ours, peer = rows["edgequant"], rows["litert-torch pt2e"]
    speed = peer["litert_latency_ms_bs1"] / ours["litert_latency_ms_bs1"]
    bars = {
        "ours at least as accurate on test_932 (W8A8)": ours["litert_acc_test_932"]
        >= peer["litert_acc_test_932"],
        "ours >= 0.95x the peer's speed": speed >= 0.95,
    }
    out = {
        "benchmark": "edge_peers_resnet20",
        "command": "python benchmarks/edge_peers_resnet20.py" + (" --quick" if args.quick else ""),
        "results": rows,
        "speed_ours_vs_peer": speed,
        "bars": bars,
        "environment": {"torch": torch.__version__, "threads": 1},
    }
    write_json(args.out, out)
    print(json.dumps(bars, indent=1), f"speed ours/peer {speed:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
