"""The decoder graph written node by node (export/lm_graph.py): ONNX Runtime's fused kernels
compute the model, and merged sibling MatMuls compute what the separate ones do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toys import tiny_llama, token_batches  # tests/toys.py

from edgequant.export.lm import export_lm_onnx

pytest.importorskip("transformers")


def test_fp32_file_runs_fused_kernels_and_computes_the_model(tmp_path) -> None:
    """The graph is written with ONNX Runtime's fused decoder kernels (GroupQueryAttention with
    the rotary embedding and KV cache, SkipSimplifiedLayerNormalization, q/k/v and gate/up merged
    into one MatMul each): the FP32 file still computes the Hugging Face model, over a prompt and
    a continuation on its KV cache, and ONNX Runtime runs those kernels."""
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    model = tiny_llama()
    ids = torch.cat([b["input_ids"] for b in token_batches(1, 32, seed=7)])
    path = tmp_path / "fp32.onnx"
    info = export_lm_onnx(model, path, quantized=False)
    assert any("6 weight MatMuls merged" in note for note in info.notes)  # 3 a block
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert ops["MatMul"] == 2 * 4 + 1  # qkv, o, gate+up, down a block; the lm_head
    assert ops["Split"] == 2  # gate/up; the attention reads q/k/v packed
    assert not {"Softmax", "Transpose", "Range", "Where"} & set(ops)
    assert len(onnx.load(str(tmp_path / "optimized.onnx")).graph.node) < 20 * 2 + 15
    empty = np.zeros((1, 2, 0, 16), np.float32)
    past = {f"past_{k}_{i}": empty for i in range(2) for k in ("key", "value")}
    outputs = ["logits"] + [f"present_{k}_{i}" for i in range(2) for k in ("key", "value")]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    full = session.run(["logits"], {"input_ids": ids.numpy(), **past})[0]
    assert np.abs(full - ref).max() < 1e-4 * np.abs(ref).max()
    # A prompt of 20 tokens, then the next 12 at once on its cache (positions 20..31).
    first = session.run(outputs, {"input_ids": ids[:, :20].numpy(), **past})
    cache = {name: first[1 + j] for j, name in enumerate(past)}
    rest = session.run(["logits"], {"input_ids": ids[:, 20:].numpy(), **cache})[0]
    steps = np.concatenate([first[0], rest], axis=1)
    assert np.abs(steps - ref).max() < 1e-4 * np.abs(ref).max()


def test_merged_matmulnbits_with_zero_points_compute_what_the_separate_ones_do() -> None:
    """merge_sibling_matmuls on MatMulNBits with zero points: codes, scales and zero points
    side by side along N, outputs split back, the same numbers as the separate nodes."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgequant.export.lm_graph import merge_sibling_matmuls

    rng = np.random.default_rng(0)
    k, block, widths = 128, 32, (48, 16, 32)
    nodes, inits, outs = [], [], []
    for j, n in enumerate(widths):
        codes = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
        inits += [
            numpy_helper.from_array(codes, f"w{j}"),
            numpy_helper.from_array(rng.random(n * k // block).astype(np.float32), f"s{j}"),
            numpy_helper.from_array(rng.integers(0, 256, (n, 2), dtype=np.uint8), f"z{j}"),
        ]
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block}
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["x", f"w{j}", f"s{j}", f"z{j}"],
                [f"y{j}"],
                name=f"m{j}/MatMulNBits",
                domain="com.microsoft",
                **attrs,
            )
        )
        outs.append(helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, [1, 3, n]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], outs, inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
    feed = {"x": rng.standard_normal((1, 3, k)).astype(np.float32)}

    def run(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, feed)

    before = run(model)
    assert merge_sibling_matmuls(model) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "Split"]
    for a, b in zip(before, run(model), strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
