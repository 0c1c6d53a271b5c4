"""ResNet-20 in ExecuTorch (XNNPACK): eq.export_executorch beside ExecuTorch's own XNNPACKQuantizer
PT2E flow, at W8A8 and at W4A8, same images, same runtime, one run.

Both from the pretrained ResNet-20 of ../shared with the same 512 calibration images of
train_4660. Ours: `eq.quantize(model, Recipe.preset(p).for_target("executorch"), calib)` with
its defaults, then `eq.export_executorch(qmodel, path, x932[:1], verify_data=test_932 in batches
of 64)`. The peer, as ExecuTorch's documentation writes it: `XNNPACKQuantizer().set_global(
get_symmetric_quantization_config(is_per_channel=True))` (W4A8: the same with weight_qmin=-7,
weight_qmax=7, its 4-bit weight grid in int8 containers, the same grid as our w4a8 preset),
torchao's `prepare_pt2e`, calibration one image at a time (the exported graph has batch 1),
`convert_pt2e`, `to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`.
Reported: accuracy of each .pte in ExecuTorch on test_932 and on the 10,000 JPEG images, its
size, and batch-1 latency of all four programs, interleaved, one thread, best of 3 medians of 200.

    OMP_NUM_THREADS=1 flock /tmp/edgequant-bench.lock python \
        benchmarks/edge_peers_executorch_resnet20.py \
        [--out benchmarks/results/edge_peers_executorch_resnet20.json] [--quick]
"""

from __future__ import annotations

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
from edgequant.export.executorch import ExecuTorchRunner
from edgequant.recipe import Recipe

PRESETS = ("w8a8", "w4a8")


def peer_pte(
    model: torch.nn.Module, calib: torch.Tensor, example: torch.Tensor, bits: int
) -> bytes:
    """ExecuTorch's XNNPACKQuantizer PT2E flow, static, per-channel symmetric `bits`-bit weights
    (narrow range), int8 asymmetric activations."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    qmax = 2 ** (bits - 1) - 1
    config = get_symmetric_quantization_config(
        is_per_channel=True, weight_qmin=-qmax, weight_qmax=qmax
    )
    quantizer = XNNPACKQuantizer().set_global(config)
    graph = torch.export.export(model.eval(), (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
    with torch.no_grad():
        for i in range(calib.shape[0]):
            prepared(calib[i : i + 1])
    converted = convert_pt2e(prepared)
    program = to_edge_transform_and_lower(
        torch.export.export(converted, (example,)), partitioner=[XnnpackPartitioner()]
    ).to_executorch()
    return bytes(program.buffer)


def latency_ms(runner: ExecuTorchRunner, x: np.ndarray) -> float:
    sample = [torch.from_numpy(x[:1])]
    return batch1_median_ms(lambda: runner.method.execute(sample))


def main() -> int:
    args = resnet20_parser(
        __doc__, "benchmarks/results/edge_peers_executorch_resnet20.json"
    ).parse_args()
    if cifar_missing():
        return 0
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(1)  # XNNPACK's threadpool: one thread
    data = load_resnet20_cifar(threads=1)
    model, x932 = data.model, data.x932
    sets = eval_sets(data, args.quick)
    programs: dict[str, bytes] = {}
    rows: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="eq-edge-et-peers-"))
    for preset in PRESETS:
        start = time.perf_counter()
        recipe = Recipe.preset(preset).for_target("executorch")
        qmodel = eq.quantize(model, recipe, data.calib, method="static")
        path = work / f"ours_{preset}.pte"
        info = eq.export_executorch(qmodel, path, x932[:1], verify_data=list(x932.split(64)))
        name = f"edgequant {preset}"
        programs[name] = path.read_bytes()
        rows[name] = {
            "weights": recipe.weight.short(),
            "activations": recipe.activation.short(),
            "pipeline": qmodel.quant_info.get("pipeline"),  # type: ignore[union-attr]
            "quantize_and_export_wall_s": time.perf_counter() - start,
            "verification": {
                k: getattr(info.verification, k)
                for k in ("passed", "top1_agreement", "sqnr_db", "samples")
            },
        }
        print(name, rows[name], flush=True)
        start = time.perf_counter()
        peer = f"executorch xnnpackquantizer {preset}"
        try:
            programs[peer] = peer_pte(model, data.x_cal, x932[:1], int(preset[1]))
            rows[peer] = {"quantize_and_export_wall_s": time.perf_counter() - start}
        except Exception as err:  # the peer's flow failing is a result to report, not a crash
            rows[peer] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        print(peer, rows[peer], flush=True)

    runners = {name: ExecuTorchRunner(blob) for name, blob in programs.items()}
    for name, runner in runners.items():
        row = rows[name]
        row["pte_bytes"] = len(programs[name])
        for set_name, (x, y) in sets.items():
            row[f"executorch_acc_{set_name}"] = float((predictions(runner, x) == y).mean())
        print(name, json.dumps(row, default=str), flush=True)
    for name, best in best_latency_ms(runners, latency_ms, x932.numpy()).items():
        rows[name]["executorch_latency_ms_bs1"] = best

    bars: dict[str, bool | None] = {}
    for preset in PRESETS:
        ours, peer = rows[f"edgequant {preset}"], rows[f"executorch xnnpackquantizer {preset}"]
        if "executorch_acc_test_932" not in peer:
            bars[f"{preset}: peer ran"] = False
            continue
        preset_bars, ours["speed_vs_peer_bs1"] = peer_bars(preset, ours, peer, "executorch")
        bars.update(preset_bars)
    threads = portable_lib._threadpool_get_thread_count()
    out = edge_results("edge_peers_executorch_resnet20", args.quick, rows, bars, threads)
    write_json(args.out, out, default=str)
    print(json.dumps(bars, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
