"""How chaotic int8 inputs inside the blocks make the model (Recipe.block_int8_inputs; the
measurement behind export/lm.py's noise-floor verification): SmolLM2-135M, symmetric
INT4 group 64 by a plain weight-only call without calib_data, with every quantized Linear's
input rounded to int8 per block (as ONNX Runtime's MatMulNBits at accuracy_level=4 computes).
Next-token agreement and logit distance on 2 x 256 held-out Shakespeare tokens between: the
ONNX Runtime file (every layer at accuracy_level=4), the simulation, the simulation with the
embedding changed by a relative 1e-6 (float rounding size), and the simulation without int8
inputs. No timing.

    PYTHONPATH=$PWD flock /tmp/edgequant-bench.lock python benchmarks/smollm2_int8_chaos.py \
        [--out benchmarks/results/smollm2_int8_chaos.json]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402
from _smollm2 import cache_shape, int4_g64, load_with_windows  # noqa: E402

import edgequant as eq  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/smollm2_int8_chaos.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from edgequant.export.lm import export_lm_onnx, lm_session, run_windows
    from edgequant.functional import nbits_block_size
    from edgequant.metrics import next_token_nll

    loaded = load_with_windows()
    if loaded is None:
        return
    model, _, windows = loaded
    q = eq.quantize(model, int4_g64(), method="weight_only")
    layers = []
    for m in q.modules():  # int8 inputs on every quantized Linear (the default: lm_head only)
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(m, torch.nn.Linear) and wq is not None and wq.mode == "quantize":
            group = wq.spec.group_size if wq.spec.granularity == "group" else None
            m.input_block_int8 = torch.tensor(nbits_block_size(m.in_features, group))
            layers.append(m)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "all_level4.onnx"
        export_lm_onnx(q, path)  # no verification: it is what is measured here
        session = lm_session(path, threads=2)
        runs = run_windows(session, windows, *cache_shape(model))
        deployed = torch.from_numpy(np.concatenate(runs))

    def simulate(perturb: float = 0.0) -> torch.Tensor:
        with torch.no_grad():
            w = q.model.embed_tokens.weight
            saved = w.clone()
            if perturb:
                g = torch.Generator().manual_seed(0)
                w.mul_(1 + perturb * torch.randn(w.shape, generator=g))
            out = torch.cat([q(input_ids=r.reshape(1, -1)).logits for r in windows])
            w.copy_(saved)
        return out

    sim = simulate()
    perturbed = simulate(1e-6)
    saved = [m.input_block_int8 for m in layers]
    for m in layers:
        m.input_block_int8 = None
    float_inputs = simulate()
    for m, b in zip(layers, saved, strict=True):
        m.input_block_int8 = b
    logits = {"deployed": deployed, "perturbed": perturbed, "float_inputs": float_inputs}

    def ppl(x: torch.Tensor) -> float:
        nll, n = next_token_nll(x, windows)
        return math.exp(nll / n)

    rows = {
        name: {
            "agreement_with_simulation": float((x.argmax(-1) == sim.argmax(-1)).float().mean()),
            "relative_logit_distance": float((x - sim).norm() / sim.norm()),
            "perplexity": ppl(x),
        }
        for name, x in logits.items()
    }
    rows["simulation"] = {"perplexity": ppl(sim)}
    print(rows, flush=True)
    write_json(
        args.out,
        {
            "model": "SmolLM2-135M-Instruct, symmetric INT4 g64 (round to nearest), 8-bit lm_head",
            "windows": "2 x 256 tokens of tinyshakespeare.txt",
            "int8_inputs": f"every quantized Linear ({len(layers)})",
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
