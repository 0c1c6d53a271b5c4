"""The demo's W2A2 QAT, epoch by epoch: fit_qat's training loss and the validation accuracy after
each epoch (select="last": every epoch trained, none chosen), with fit_qat's defaults and with
one setting changed at a time. MNIST-1D, the demo's 16-channel CNN (trained without QAT's
held-out batches), GPTQ rounding as the demo's recipe; the test split is not read.

    flock /tmp/edgequant-bench.lock python benchmarks/demo_qat_loss.py
"""

from __future__ import annotations

import subprocess
from typing import Any

import torch
from _results import write_json  # benchmarks/_results.py (sys.path[0] here)

import edgequant as eq
from edgequant.examples import mnist1d as M
from edgequant.report.demo import CHANNELS, low_bit_rounding

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "range_lr_scale=0.01": {"range_lr_scale": 0.01},
    "kd_weight=0.5": {"kd_weight": 0.5},
}


def main() -> int:
    torch.set_num_threads(1)
    model = M.trained_cnn(channels=CHANNELS, qat_holdout=True)
    data = M.load_mnist1d()
    x_val, y_val = data["x_val"], data["y_val"]
    calib = M.calib_batches(512)
    fit, _ = M.qat_split()

    def val_acc(q: torch.nn.Module) -> float:
        flags = {m: m.training for m in q.modules()}
        q.eval()
        with torch.no_grad():
            value = float((q(x_val).argmax(1) == y_val).float().mean())
        for m, f in flags.items():
            m.training = f
        return value

    recipe = low_bit_rounding(eq.Recipe.preset("w2a2"))
    out: dict[str, Any] = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "ptq_val": val_acc(eq.quantize(model, recipe, calib, method="static")),
        "fp32_val": val_acc(model),
        "epochs": 10,
        "variants": {},
    }
    for name, settings in VARIANTS.items():
        qmodel = eq.prepare_qat(model, recipe, calib_data=calib)
        val: list[float] = []
        records = eq.fit_qat(
            qmodel,
            fit,
            epochs=10,
            teacher=model,
            progress=False,
            select="last",
            on_epoch_end=lambda epoch, record, q=qmodel, v=val: v.append(val_acc(q)),
            **settings,
        )
        out["variants"][name] = {"val": val, "loss": [r.get("loss") for r in records]}
        print(name, out["variants"][name], flush=True)
    write_json("benchmarks/results/demo_qat_loss.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
