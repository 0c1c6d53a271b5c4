"""Issue 9's figures: QAT of the pretrained ResNet-20 on CIFAR-10, with PTQ at the same bits beside.

Each QAT run starts from the library's best PTQ model at the same bits (eq.quantize: learned
rounding and bias correction below 8 bits; qat.prepare.start_from copies its weights into
eq.prepare_qat's model, calibrated the same way), then eq.fit_qat with LSQ, Adam, a cosine
schedule and distillation from the FP32 model. Fine-tuning data: the first 4000 images of
train_4660 (examples.cifar10.train_split), optionally with random crops (zero padding 4) and
horizontal flips. The last 660 images (heldout_split) choose everything: the settings (--sweep,
which evaluates no test set at all) and the epoch kept (the PTQ start, epoch 0, included): the one
whose outputs are closest to the FP32 model's on the held-out images (mean KL). Every reported
accuracy is the *exported* model's, run in ONNX Runtime, on test_932 and the 10,000 JPEG images.

    # settings, on held-out images only:
    flock /tmp/edgequant-bench.lock python benchmarks/qat_resnet20.py --sweep \
        --presets w4a4 --configs "lr=1e-4,aug=0;lr=1e-4,aug=1;lr=3e-5,aug=1;lr=3e-4,aug=1"
    # the runs, with the chosen settings:
    flock /tmp/edgequant-bench.lock python benchmarks/qat_resnet20.py \
        --presets w4a4,w8a8,w3a3,w2a2 --configs "lr=1e-4,aug=1"
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _qat import (  # benchmarks/_qat.py (sys.path[0] here)
    heldout_scores,
    parse_configs,
    qat_from_ptq,
)
from _results import cifar_missing, write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.export.onnx import export_float_onnx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="w4a4,w8a8,w3a3,w2a2")
    parser.add_argument("--configs", default="", help="';'-separated settings, see DEFAULTS")
    parser.add_argument("--sweep", action="store_true", help="held-out only: no test set is read")
    parser.add_argument("--calib", type=int, default=1024, help="calibration images")
    parser.add_argument("--no-jpeg", action="store_true", help="skip the 10,000 JPEG images")
    parser.add_argument(
        "--judge",
        choices=("clean", "clean+jpeg"),
        default="clean",
        help="the held-out KL that keeps an epoch: the 660 held-out images, or the mean of that "
        "and the KL on the same images JPEG'd and mirrored (cifar10.heldout_jpeg_split)",
    )
    parser.add_argument(
        "--seeds",
        default="0",
        help="','-separated training seeds, each a run of every config (data order, mixup, "
        "augmentation): the spread across seeds measures how much of a result is the draw",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(
            f"--seeds: expected integers separated by ',', got {args.seeds!r}"
        ) from None
    if cifar_missing():
        return 0
    configs = parse_configs(args.configs or "lr=1e-4")
    torch.set_num_threads(2)
    model = C.load_resnet20().eval()
    train_x, train_y = C.train_split()
    heldout = C.heldout_split()
    with torch.no_grad():
        teacher_logp = F.log_softmax(model(heldout[0]), -1)
    heldout_jpeg = None
    if args.judge == "clean+jpeg":
        x_hj, y_hj = C.heldout_jpeg_split()
        with torch.no_grad():
            heldout_jpeg = (x_hj, y_hj, F.log_softmax(model(x_hj), -1))
    train_x_jpeg = C.train_jpeg_split()[0] if any(c["jpeg"] > 0 for c in configs) else None
    calib = list(C.calibration_split(args.calib)[0].split(128))
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "train": "train_4660[:4000], batch 128 (aug=1: random crop, pad 4, + flip)",
        "heldout": "train_4660[4000:] (660 images): settings and kept epoch (lowest KL to FP32)",
        "judge": args.judge,
        "calibration": f"{args.calib} images of train_4660[:4000]",
        "loss": "kd * KL(teacher, T) * T^2 + (1 - kd) * CE; Adam, cosine lr per step",
    }
    out = Path(
        args.out
        or (
            "benchmarks/results/qat_resnet20_sweep.json"
            if args.sweep
            else "benchmarks/results/qat_resnet20.json"
        )
    )
    results: dict[str, Any] = json.loads(out.read_text())["results"] if out.is_file() else {}

    test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    work = Path(tempfile.mkdtemp(prefix="eq-qat-"))
    fp32_size = 0
    if not args.sweep:
        x932, y932 = C.load_split("test_932")
        test_sets["test_932"] = (x932, y932)
        if not args.no_jpeg:
            test_sets["jpeg_10000"] = C.load_jpeg_test()
        fp32_path = work / "fp32.onnx"
        export_float_onnx(model, fp32_path, x932[:8])
        fp32_size = fp32_path.stat().st_size
        fn = C.ort_predict_fn(fp32_path)
        results["fp32"] = {
            **{f"acc_{k}": C.accuracy(fn, x, y) for k, (x, y) in test_sets.items()},
            "size_bytes": fp32_size,
        }
        print("fp32", json.dumps(results["fp32"]), flush=True)

    def deployed(qmodel: torch.nn.Module, name: str) -> dict[str, Any]:
        if args.sweep:
            return {}
        x932 = test_sets["test_932"][0]
        path = work / f"{name}.onnx"
        info = eq.export_onnx(qmodel, path, x932[:8], verify_data=list(x932.split(256)))
        fn = C.ort_predict_fn(path)
        row: dict[str, Any] = {f"acc_{k}": C.accuracy(fn, x, y) for k, (x, y) in test_sets.items()}
        row.update(
            size_bytes=path.stat().st_size,
            size_ratio_vs_fp32=path.stat().st_size / fp32_size,
            top1_agreement_test_932=info.verification.top1_agreement,
        )
        return row

    def save() -> None:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
        write_json(out, {**meta, "results": results}, default=str)

    for name in args.presets.split(","):
        # Every calibration image: a preset's calib_samples (512) would cap them.
        preset = eq.Recipe.preset(name).replace(calib_samples=args.calib)
        start = time.perf_counter()
        ptq = eq.quantize(model, preset, calib, method="static")
        ptq_row: dict[str, Any] = {
            "wall_s": time.perf_counter() - start,
            **heldout_scores(ptq, heldout, teacher_logp),
            **(
                {
                    f"heldout_jpeg_{k[len('heldout_') :]}": v
                    for k, v in heldout_scores(ptq, heldout_jpeg[:2], heldout_jpeg[2]).items()
                }
                if heldout_jpeg is not None
                else {}
            ),
            "pipeline": ptq.quant_info.get("pipeline"),
        }
        ptq_row.update(deployed(ptq, f"ptq_{name}"))
        print(f"ptq {name}", json.dumps(ptq_row, default=str), flush=True)
        rows = []
        for config, seed in [(c, s) for c in configs for s in seeds]:
            final, row = qat_from_ptq(
                model,
                ptq,
                preset,
                calib,
                train_x,
                train_y,
                heldout,
                teacher_logp,
                config,
                seed=seed,
                heldout_jpeg=heldout_jpeg,
                train_x_jpeg=train_x_jpeg,
            )
            row["seed"] = seed
            row.update(deployed(final, f"qat_{name}"))
            print(
                f"qat {name}",
                json.dumps({k: v for k, v in row.items() if k != "by_epoch"}),
                flush=True,
            )
            rows.append(row)
            results[name] = {"ptq": ptq_row, "qat": rows}
            save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
