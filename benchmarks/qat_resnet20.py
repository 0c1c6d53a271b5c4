"""Issue 9's figures: QAT of the pretrained ResNet-20 on CIFAR-10, with PTQ at the same bits beside.

Fine-tuning data: the first 4000 images of train_4660 (examples.cifar10.train_split), with random
crops (zero padding 4) and horizontal flips; the last 660 (heldout_split) choose the learning rate
and are never trained on. Starting grids: PTQ calibration on 512 training images with MSE-searched
activation ranges (and MSE weight ranges below 8 bits); LSQ learns them; knowledge distillation from
the FP32 model. Every reported accuracy is the *exported* model's, run in ONNX Runtime, on test_932
and on the 10,000 JPEG test images.

    # lr chosen on the held-out images by short W4A4 runs (--lrs, --select-epochs), then the runs:
    flock /tmp/edgequant-bench.lock python benchmarks/qat_resnet20.py \
        --presets w4a4,w8a8,w3a3,w2a2 --epochs 10 --epochs-for w8a8=5
"""

from __future__ import annotations

import argparse
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


OPTIMIZER = "sgd"


def recipe_for(preset: str) -> eq.Recipe:
    """The preset (first/last layer 8-bit below 8 bits), MSE-searched activation ranges, MSE
    weight ranges below 8 bits, LSQ range learning."""
    recipe = eq.Recipe.preset(preset)
    assert recipe.weight is not None and recipe.activation is not None
    weight = recipe.weight.replace(observer="mse") if recipe.weight.bits < 8 else recipe.weight
    return recipe.replace(
        weight=weight, activation=recipe.activation.replace(observer="mse"), range_learning="lsq"
    )


def qat_run(
    model: torch.nn.Module,
    preset: str,
    calib: list[torch.Tensor],
    train: Augmented,
    heldout: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    lr: float,
    seed: int = 0,
    val_each_epoch: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    qmodel = eq.prepare_qat(model, recipe_for(preset), calib)
    start_acc = C.accuracy(qmodel, *heldout)
    history = eq.fit_qat(
        qmodel,
        train,
        epochs=epochs,
        lr=lr,
        optimizer=OPTIMIZER,
        momentum=0.9,
        teacher=model,
        temperature=2.0,
        kd_weight=0.5,
        val_fn=(lambda m: C.accuracy(m, *heldout)) if val_each_epoch else None,
        progress=False,
        seed=seed,
    )
    return qmodel, {
        "preset": preset,
        "lr": lr,
        "epochs": epochs,
        "heldout_start": start_acc,
        "heldout_by_epoch": [r["val"] for r in history]
        if val_each_epoch
        else [C.accuracy(qmodel, *heldout)],
        "loss_by_epoch": [r["loss"] for r in history],
        "train_wall_s": time.perf_counter() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="w4a4,w8a8,w3a3,w2a2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None, help="default: chosen on held-out")
    parser.add_argument("--select", action="store_true", help="only choose lr on held-out images")
    parser.add_argument("--lrs", default="0.003,0.01")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--select-preset", default="w4a4")
    parser.add_argument("--select-epochs", type=int, default=1)
    parser.add_argument("--epochs-for", default="", help="per-preset epochs, e.g. 'w8a8=5'")
    parser.add_argument("--no-ptq", action="store_true", help="skip the PTQ comparison runs")
    parser.add_argument("--no-jpeg", action="store_true", help="skip the 10,000 JPEG images")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if shared_dir() is None:
        print(
            "skipped: ../shared (CIFAR-10, ResNet-20 weights) is absent; set EDGEQUANT_SHARED",
            file=sys.stderr,
        )
        return 0
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    if args.epochs > 10:
        parser.error("issue 9's budget is at most 10 epochs")
    torch.set_num_threads(2)
    model = C.load_resnet20()
    x_train, y_train = C.train_split()
    heldout = C.heldout_split()
    calib = list(C.calibration_split(512)[0].split(64))
    train = Augmented(x_train, y_train)
    presets = args.presets.split(",")
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "train": "train_4660[:4000], random crop (pad 4) + flip, batch 128",
        "heldout": "train_4660[4000:] (660 images): lr choice only",
        "calibration": "512 images of train_4660[:4000]; activation observer mse (weights mse below 8 bits)",
        "loss": "0.5 * KL(teacher T=2) * T^2 + 0.5 * CE, cosine lr per step",
        "optimizer": args.optimizer,
    }

    if args.select or args.lr is None:
        rows = []
        for lr in map(float, args.lrs.split(",")):
            _, row = qat_run(
                model, args.select_preset, calib, train, heldout, args.select_epochs, lr
            )
            print("select", json.dumps(row), flush=True)
            rows.append(row)
        best = max(rows, key=lambda r: r["heldout_by_epoch"][-1])
        meta["lr_selection"] = {
            "rule": f"best held-out accuracy after {args.select_epochs} epochs of "
            f"{args.select_preset}, among lrs {args.lrs}",
            "runs": rows,
            "chosen": best["lr"],
        }
        if args.select:
            out = Path(args.out or "benchmarks/results/qat_resnet20_lr_selection.json")
            out.write_text(json.dumps(meta, indent=1))
            return 0
        args.lr = best["lr"]
    epochs_for = {
        k: int(v) for k, v in (item.split("=") for item in args.epochs_for.split(",") if item)
    }

    import onnxruntime

    x932, y932 = C.load_split("test_932")
    test_sets = {"test_932": (x932, y932)}
    if not args.no_jpeg:
        test_sets["jpeg_10000"] = C.load_jpeg_test()
    work = Path(tempfile.mkdtemp(prefix="eq-qat-"))
    fp32_path = work / "fp32.onnx"
    export_float_onnx(model, fp32_path, x932[:8])
    fp32_size = fp32_path.stat().st_size

    def deployed(qmodel: torch.nn.Module, name: str) -> dict[str, Any]:
        path = work / f"{name}.onnx"
        info = eq.export_onnx(qmodel, path, x932[:8], verify_data=list(x932.split(256)))
        fn = C.ort_predict_fn(path)
        row: dict[str, Any] = {f"acc_{k}": C.accuracy(fn, x, y) for k, (x, y) in test_sets.items()}
        row.update(
            size_bytes=path.stat().st_size,
            size_ratio_vs_fp32=path.stat().st_size / fp32_size,
            top1_agreement_test_932=info.verification.top1_agreement,
            sqnr_db=info.verification.sqnr_db,
        )
        return row

    fp32 = {
        f"acc_{k}": C.accuracy(C.ort_predict_fn(fp32_path), x, y) for k, (x, y) in test_sets.items()
    }
    print("fp32", json.dumps(fp32), flush=True)
    out = Path(args.out or "benchmarks/results/qat_resnet20.json")
    # One preset per invocation is fine: rows of earlier runs in the file are kept.
    results: dict[str, Any] = json.loads(out.read_text())["results"] if out.is_file() else {}
    results["fp32"] = {**fp32, "size_bytes": fp32_size}
    for preset in presets:
        recipe = recipe_for(preset)
        start = time.perf_counter()
        ptq_row: dict[str, Any]
        try:  # PTQ is the comparison; a failure there is recorded, the QAT run still happens
            if args.no_ptq:
                raise RuntimeError("skipped (--no-ptq)")
            ptq = eq.quantize(model, recipe, calib)
            ptq_row = {"wall_s": time.perf_counter() - start, "heldout": C.accuracy(ptq, *heldout)}
            ptq_row.update(deployed(ptq, f"ptq_{preset}"))
            ptq_row["pipeline"] = ptq.quant_info.get("pipeline")
        except Exception as err:
            ptq_row = {"failed": f"{type(err).__name__}: {err}"}
        print(f"ptq {preset}", json.dumps(ptq_row, default=str), flush=True)
        epochs = epochs_for.get(preset, args.epochs)
        # Held-out accuracy at the end only (it chose nothing here; evaluating costs time).
        qmodel, qat_row = qat_run(
            model, preset, calib, train, heldout, epochs, args.lr, val_each_epoch=False
        )
        qat_row.update(deployed(qmodel, f"qat_{preset}"))
        print(f"qat {preset}", json.dumps(qat_row), flush=True)
        results[preset] = {"ptq": ptq_row, "qat": qat_row}
        out.write_text(
            json.dumps(
                {**meta, "onnxruntime": onnxruntime.__version__, "results": results},
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
