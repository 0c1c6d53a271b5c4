"""Where LiteRT's default path (XNNPACK) spends ResNet-20's batch-1 time: ours, FP32, the peer.

Three .tflite files of the pretrained ResNet-20 of ../shared, all converted by litert-torch:
ours (`eq.quantize` W8A8 for `mcu-int8` with 512 calibration images of train_4660, then
`eq.export_tflite`, verified on its example image), the FP32 model, and litert-torch's own PT2E
flow (benchmarks/edge_peers_resnet20.py's `peer_tflite`). Measured side by side in one process,
one thread: whole-model batch-1 latency (interleaved, best of 3 medians of 200 runs), then per op
by truncation (LiteRT's Python API has no op profiler): the file cut after its first k ops runs
in t(k), and op k is charged t(k) - t(k-1) (best of 3 medians of 100 runs each; XNNPACK fuses
and plans each cut anew, so the split is approximate: an op fused into the next one, like a PAD
into its conv, is charged to itself when it ends a cut, and its successor reads low). Last, one
3x3 conv of each stage's shape alone, int8 against FP32.

    flock /tmp/edgequant-bench.lock python benchmarks/edge_profile_resnet20.py \
        [--out benchmarks/results/edge_profile_resnet20.json]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _resnet20 import load_resnet20_cifar, resnet20_parser  # benchmarks/_resnet20.py
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)
from edge_peers_resnet20 import peer_tflite
from edge_resnet20 import latency_ms

import edgequant as eq
from edgequant.export.tflite_runtime import (
    TFLiteRunner,
    convert_program,
    litert_interpreter,
    tensor_ops,
)
from edgequant.recipe import Recipe


def truncated(model: bytes, k: int) -> bytes:
    """The model's first k ops, the last one's output as the graph's output."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(model, 0)
    graph = m.subgraphs[0]
    graph.operators = graph.operators[:k]
    graph.outputs = [int(graph.operators[-1].outputs[0])]
    m.signatureDefs = []
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def invoke_ms(model: bytes, repeats: int = 100) -> float:
    """Median latency of one invoke of the XNNPACK interpreter on a zero input (20 warm-ups)."""
    it = litert_interpreter(model, reference=False)
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    for _ in range(20):
        it.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def per_op(model: bytes) -> dict:
    ops = tensor_ops(model)[0]
    cuts = [truncated(model, k) for k in range(1, len(ops) + 1)]
    best = [min(invoke_ms(c) for _ in range(3)) for c in cuts]
    charged = [best[0]] + [best[k] - best[k - 1] for k in range(1, len(best))]
    by_type: dict[str, float] = {}
    for op, ms in zip(ops, charged, strict=True):
        by_type[op] = by_type.get(op, 0.0) + ms
    return {
        "whole_ms": best[-1],
        "by_op_type_ms": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "ops_ms": [[op, ms] for op, ms in zip(ops, charged, strict=True)],
    }


def one_conv_ms(channels: int, size: int, work: Path) -> dict[str, float]:
    """Batch-1 XNNPACK latency of one 3x3 conv (channels -> channels, stride 1, padding 1, ReLU)
    on a size x size input, as int8 (eq.quantize mcu-int8 + eq.export_tflite) and as FP32, the
    shape of ResNet-20's convs in one stage; interleaved, best of 3 medians."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU())
    conv = conv.eval()
    calib = [torch.randn(8, channels, size, size) for _ in range(2)]
    qconv = eq.quantize(conv, Recipe.preset("w8a8").for_target("mcu-int8"), calib, "static")
    path = work / f"conv{channels}x{size}.tflite"
    one = calib[0][:1]
    eq.export_tflite(qconv, path, one)
    files = {
        "int8": path.read_bytes(),
        "fp32": convert_program(torch.export.export(conv, (one,)), (one,), False),
    }
    best = {name: min(invoke_ms(f, 200) for _ in range(3)) for name, f in files.items()}
    return {**best, "fp32_over_int8": best["fp32"] / best["int8"]}


def main() -> int:
    args = resnet20_parser(__doc__, "benchmarks/results/edge_profile_resnet20.json").parse_args()
    if cifar_missing():
        return 0
    data = load_resnet20_cifar(threads=1)
    model, x932 = data.model, data.x932
    work = Path(tempfile.mkdtemp(prefix="eq-edge-profile-"))
    one = x932[:1]

    qmodel = eq.quantize(model, Recipe.preset("w8a8").for_target("mcu-int8"), data.calib, "static")
    eq.export_tflite(qmodel, work / "ours.tflite", one)
    files = {
        "edgequant int8": (work / "ours.tflite").read_bytes(),
        "fp32": convert_program(torch.export.export(model.eval(), (one,)), (one,), False),
        "litert-torch pt2e int8": peer_tflite(model, data.x_cal, one),
    }
    runners = {name: TFLiteRunner(f, "litert") for name, f in files.items()}
    x = x932.numpy()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(3):  # interleaved, so all see the same machine load
        for name, runner in runners.items():
            times[name].append(latency_ms(runner, x))
    rows: dict[str, dict] = {}
    for name, f in files.items():
        rows[name] = {"latency_ms_bs1": min(times[name]), "ops": tensor_ops(f)[0]}
        print(name, f"{rows[name]['latency_ms_bs1']:.3f} ms", flush=True)
    for name, f in files.items():
        rows[name]["per_op"] = per_op(f)
        print(name, json.dumps(rows[name]["per_op"]["by_op_type_ms"]), flush=True)
    # ResNet-20's three stages: 16 channels at 32x32, 32 at 16x16, 64 at 8x8.
    convs = {f"{c}ch_{n}x{n}": one_conv_ms(c, n, work) for c, n in ((16, 32), (32, 16), (64, 8))}
    print(json.dumps(convs), flush=True)
    fp32 = rows["fp32"]["latency_ms_bs1"]
    out = {
        "benchmark": "edge_profile_resnet20",
        "command": "python benchmarks/edge_profile_resnet20.py",
        "results": rows,
        "speedup_vs_fp32_bs1": {n: fp32 / r["latency_ms_bs1"] for n, r in rows.items()},
        "one_conv_ms_bs1": convs,
        "environment": {"torch": torch.__version__, "threads": 1},
    }
    write_json(args.out, out)
    print(json.dumps(out["speedup_vs_fp32_bs1"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
