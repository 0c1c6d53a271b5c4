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
import copy
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.examples.shared import shared_dir
from edgequant.export.onnx import export_float_onnx
from edgequant.qat import finalize
from edgequant.qat.prepare import start_from


class Augmented:
    """Shuffled batches of (images, labels) with random crop (zero padding 4) and horizontal flip,
    drawn from the global torch generator (so fit_qat's checkpoints can resume the same order)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, pad: int = 4
    ) -> None:
        self.x, self.y, self.batch_size, self.pad = x, y, batch_size, pad

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x))
        h, w = self.x.shape[-2:]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = F.pad(self.x[idx], (self.pad,) * 4)
            n = x.shape[0]
            top = torch.randint(0, 2 * self.pad + 1, (n,))
            left = torch.randint(0, 2 * self.pad + 1, (n,))
            rows = (top[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1)
            cols = (left[:, None] + torch.arange(w))[:, None, None, :]  # (n, 1, 1, w)
            x = x[
                torch.arange(n)[:, None, None, None],
                torch.arange(x.shape[1])[None, :, None, None],
                rows,
                cols,
            ]
            flip = torch.rand(n) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x.contiguous(), self.y[idx]


DEFAULTS: dict[str, Any] = {"lr": 1e-4, "aug": 1, "kd": 1.0, "t": 4.0, "epochs": 10, "slr": 1.0}


def parse_configs(text: str) -> list[dict[str, Any]]:
    """ "lr=1e-4,aug=1;lr=3e-5" -> settings dicts over DEFAULTS (kd: share of distillation)."""
    configs = []
    for item in filter(None, (c.strip() for c in text.split(";"))):
        config = dict(DEFAULTS)
        for pair in item.split(","):
            key, _, value = pair.partition("=")
            if key not in DEFAULTS:
                raise SystemExit(
                    f"--configs: unknown key {key!r} in {item!r}; known: {list(DEFAULTS)}"
                )
            config[key] = type(DEFAULTS[key])(float(value)) if key != "lr" else float(value)
        if config["epochs"] > 10:
            raise SystemExit("issue 9's budget is at most 10 epochs")
        configs.append(config)
    return configs


def kl_to_teacher(model: torch.nn.Module, x: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    with torch.no_grad():
        logp = torch.cat([F.log_softmax(model.eval()(b), -1) for b in x.split(256)])
    return float(F.kl_div(logp, teacher_logp, log_target=True, reduction="batchmean"))


def qat_from_ptq(
    model: torch.nn.Module,
    ptq: torch.nn.Module,
    preset: str,
    calib: list[torch.Tensor],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    heldout: tuple[torch.Tensor, torch.Tensor],
    teacher_logp: torch.Tensor,
    config: dict[str, Any],
    seed: int = 0,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """QAT from the PTQ model; the epoch kept (0 = the PTQ start) has the lowest held-out KL."""
    torch.manual_seed(seed)
    qmodel = eq.prepare_qat(model, preset, calib_data=calib)
    start_from(qmodel, ptq)
    if config["aug"]:
        train: Any = Augmented(train_x, train_y)
    else:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        train = list(zip(train_x[order].split(128), train_y[order].split(128), strict=True))
    epochs: list[dict[str, Any]] = []
    best: dict[str, Any] = {}

    def evaluate(epoch: int, record: dict[str, Any] | None = None) -> None:
        row = {
            "epoch": epoch,
            "heldout_kl": kl_to_teacher(qmodel, heldout[0], teacher_logp),
            "heldout_acc": C.accuracy(qmodel, *heldout),
        }
        if record is not None:
            row.update(loss=record["loss"], wall_s=record["wall_s"])
        epochs.append(row)
        print(f"  {preset} {config} epoch {epoch}: {json.dumps(row)}", flush=True)
        if not best or row["heldout_kl"] < best["heldout_kl"]:
            best.update(row, state=copy.deepcopy(qmodel.state_dict()))

    evaluate(0)
    start = time.perf_counter()
    eq.fit_qat(
        qmodel,
        train,
        epochs=int(config["epochs"]),
        lr=config["lr"],
        optimizer="adam",
        teacher=model,
        temperature=config["t"],
        kd_weight=config["kd"],
        range_lr_scale=config["slr"],
        on_epoch_end=evaluate,
        progress=False,
        seed=seed,
    )
    train_s = time.perf_counter() - start
    qmodel.load_state_dict(best.pop("state"))
    return finalize(qmodel), {
        "config": config,
        "by_epoch": epochs,
        "kept_epoch": best["epoch"],
        "kept": best,
        "train_wall_s": train_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="w4a4,w8a8,w3a3,w2a2")
    parser.add_argument("--configs", default="", help="';'-separated settings, see DEFAULTS")
    parser.add_argument("--sweep", action="store_true", help="held-out only: no test set is read")
    parser.add_argument("--calib", type=int, default=1024, help="calibration images")
    parser.add_argument("--no-jpeg", action="store_true", help="skip the 10,000 JPEG images")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if shared_dir() is None:
        print(
            "skipped: ../shared (CIFAR-10, ResNet-20 weights) is absent; set EDGEQUANT_SHARED",
            file=sys.stderr,
        )
        return 0
    configs = parse_configs(args.configs or "lr=1e-4")
    torch.set_num_threads(2)
    model = C.load_resnet20().eval()
    train_x, train_y = C.train_split()
    heldout = C.heldout_split()
    with torch.no_grad():
        teacher_logp = F.log_softmax(model(heldout[0]), -1)
    calib = list(C.calibration_split(args.calib)[0].split(128))
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "train": "train_4660[:4000], batch 128 (aug=1: random crop, pad 4, + flip)",
        "heldout": "train_4660[4000:] (660 images): settings and kept epoch (lowest KL to FP32)",
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
        out.write_text(json.dumps({**meta, "results": results}, indent=1, default=str))

    for preset in args.presets.split(","):
        start = time.perf_counter()
        ptq = eq.quantize(model, preset, calib, method="static")
        ptq_row: dict[str, Any] = {
            "wall_s": time.perf_counter() - start,
            "heldout_kl": kl_to_teacher(ptq, heldout[0], teacher_logp),
            "heldout_acc": C.accuracy(ptq, *heldout),
            "pipeline": ptq.quant_info.get("pipeline"),
        }
        ptq_row.update(deployed(ptq, f"ptq_{preset}"))
        print(f"ptq {preset}", json.dumps(ptq_row, default=str), flush=True)
        rows = []
        for config in configs:
            final, row = qat_from_ptq(
                model, ptq, preset, calib, train_x, train_y, heldout, teacher_logp, config
            )
            row.update(deployed(final, f"qat_{preset}"))
            print(
                f"qat {preset}",
                json.dumps({k: v for k, v in row.items() if k != "by_epoch"}),
                flush=True,
            )
            rows.append(row)
            results[preset] = {"ptq": ptq_row, "qat": rows}
            save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
