"""QAT of ResNet-20 started from the best PTQ model at the same bits (issue 9): prepare_qat, then
the weights and biases of eq.quantize's model (AdaRound/GPTQ + bias correction) copied in, then
fit_qat with distillation from FP32. The epoch kept is chosen on the held-out images of train_4660
(its last 660), never on a test set; accuracy of the exported model in ONNX Runtime.

    python benchmarks/qat_from_ptq_resnet20.py [--preset w4a4] [--epochs 4] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import edgequant as eq
from edgequant.examples import cifar10 as C
from edgequant.examples.shared import shared_dir
from edgequant.qat import finalize
from edgequant.qat.prepare import start_from


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="w4a4")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="benchmarks/results/qat_from_ptq_resnet20.json")
    args = p.parse_args()
    if shared_dir() is None:
        print("skipped: ../shared is absent; set EDGEQUANT_SHARED", file=sys.stderr)
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = C.load_resnet20().eval()
    x_cal, _ = C.calibration_split(1024)
    calib = list(x_cal.split(128))
    x_tr, y_tr = C.train_split()
    order = torch.randperm(x_tr.shape[0], generator=torch.Generator().manual_seed(0))
    train = list(zip(x_tr[order].split(128), y_tr[order].split(128), strict=True))
    x_ho, y_ho = C.heldout_split()
    x932, y932 = C.load_split("test_932")
    xj, yj = C.load_jpeg_test()

    start = time.perf_counter()
    ptq = eq.quantize(model, args.preset, calib, method="static")
    ptq_s = time.perf_counter() - start
    qat = eq.prepare_qat(model, args.preset, calib_data=calib)
    start_from(qat, ptq)
    held = {0: C.accuracy(qat, x_ho, y_ho)}
    best = {"epoch": 0, "acc": held[0], "state": copy.deepcopy(qat.state_dict())}

    def keep(epoch: int, record: dict) -> None:
        acc = C.accuracy(qat, x_ho, y_ho)
        held[epoch] = acc
        print(f"epoch {epoch}: held-out {acc:.4f}", flush=True)
        if acc > best["acc"]:
            best.update(epoch=epoch, acc=acc, state=copy.deepcopy(qat.state_dict()))

    start = time.perf_counter()
    eq.fit_qat(
        qat,
        train,
        epochs=args.epochs,
        lr=args.lr,
        optimizer="adam",
        teacher=model,
        on_epoch_end=keep,
        progress=False,
    )
    train_s = time.perf_counter() - start
    qat.load_state_dict(best["state"])
    final = finalize(qat)
    work = Path(tempfile.mkdtemp(prefix="eq-qat-"))
    results = {}
    for name, m in (("ptq", ptq), ("qat", final)):
        path = work / f"{name}.onnx"
        info = eq.export_onnx(m, path, x932[:8], verify_data=list(x932.split(256)))
        fn = C.ort_predict_fn(path)
        results[name] = {
            "acc_test_932": C.accuracy(fn, x932, y932),
            "acc_jpeg_10000": C.accuracy(fn, xj, yj),
            "size_bytes": info.size_bytes,
            "top1_agreement": info.verification.top1_agreement,
        }
        print(name, json.dumps(results[name]), flush=True)
    out = {
        "preset": args.preset,
        "epochs": args.epochs,
        "lr": args.lr,
        "optimizer": "adam",
        "heldout_by_epoch": held,
        "kept_epoch": best["epoch"],
        "ptq_s": ptq_s,
        "train_s": train_s,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
