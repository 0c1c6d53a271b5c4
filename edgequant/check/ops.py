"""The operator tables of the check: which ops every target runs in integer, which have no integer
kernel in edgequant's export (and what a fully integer target offers instead), by module type,
function, method name and ONNX op type; what a row asks the user to do."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# What a row asks the user to do.
KEEP_FLOAT = "keep-float"  # the target's runtime runs it in float between DQ and Q
REPLACE = "replace"  # swap it for an op the target runs in integer (changes the function)
REMOVE = "remove"  # a monotonic op at the output: drop it, argmax is unchanged
REFUSE = "refuse"  # no integer form: this target cannot run the model

# --- ops every target runs in integer (the export quantizes them) ----------------------------
INTEGER_MODULES: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Linear: "linear",
    nn.Embedding: "embedding",
    nn.BatchNorm1d: "batchnorm (folded into the layer before it)",
    nn.BatchNorm2d: "batchnorm (folded into the layer before it)",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Hardtanh: "hardtanh",
    nn.MaxPool1d: "maxpool",
    nn.MaxPool2d: "maxpool",
    nn.AdaptiveMaxPool1d: "maxpool",
    nn.AdaptiveMaxPool2d: "maxpool",
    nn.AvgPool1d: "avgpool",
    nn.AvgPool2d: "avgpool",
    nn.AdaptiveAvgPool1d: "avgpool",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.Flatten: "reshape",
    nn.Unflatten: "reshape",
    nn.Dropout: "identity (eval)",
    nn.Identity: "identity",
}
INTEGER_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    torch.clamp: "clamp",
    torch.clip: "clamp",
    operator.add: "add",
    torch.add: "add",
    F.max_pool1d: "maxpool",
    F.max_pool2d: "maxpool",
    F.adaptive_max_pool1d: "maxpool",
    F.adaptive_max_pool2d: "maxpool",
    F.avg_pool1d: "avgpool",
    F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool1d: "avgpool",
    F.adaptive_avg_pool2d: "avgpool",
    torch.mean: "avgpool",
    torch.cat: "concat",
    torch.concat: "concat",
    torch.flatten: "reshape",
    torch.reshape: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
    torch.permute: "transpose",
    torch.transpose: "transpose",
    operator.getitem: "slice",
    F.pad: "pad",
    F.dropout: "identity (eval)",
}
INTEGER_METHODS = {
    "relu": "relu",
    "relu_": "relu",
    "clamp": "clamp",
    "clip": "clamp",
    "add": "add",
    "mean": "avgpool",
    "view": "reshape",
    "reshape": "reshape",
    "flatten": "reshape",
    "squeeze": "reshape",
    "unsqueeze": "reshape",
    "permute": "transpose",
    "transpose": "transpose",
    "contiguous": "identity",
    "__getitem__": "slice",
}
SHAPE_QUERIES = {"size", "dim", "numel", "shape"}
# Tensors of zeros made from a shape (a zero-padding shortcut's new channels, written as a
# concatenation with zeros): no computation on any value; 0 is exact on every integer grid, so
# the export carries them as the zero point.
ZEROS = "zeros (a constant: its zero point)"
ZERO_CONSTANT_FUNCTIONS: set[Any] = {torch.zeros_like, torch.zeros}
ZERO_CONSTANT_METHODS = {"new_zeros"}

# --- adaptive max pools: exported as max pools of fixed windows, or not at all ---------------
ADAPTIVE_MAX_POOL_FUNCTIONS: dict[Any, int] = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2}
ADAPTIVE_MAX_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
}
# The targets whose files have no adaptive max pool: litert-torch refuses aten.adaptive_max_pool*
# (.tflite) and it is not in ExecuTorch's core ATen set (.pte). Their exporters write one as the
# max pool of fixed windows it is when every input size is a whole multiple of its output size
# (graph_quantizers/pools.py, export/pt2e.py); uneven windows cannot be written at all.
WHOLE_WINDOWS_ONLY = frozenset({"mcu-int8", "tflite-int8", "executorch"})


def pool_windows(sizes: list[int], output_size: Any) -> list[int] | None:
    """The fixed windows (kernel = stride = input // output, per spatial size) that an adaptive
    pool of `output_size` (an int, or a sequence with None for "the input's size") takes over
    `sizes`; None where some input size is not a whole multiple of its output size."""
    wanted = (
        list(output_size) if isinstance(output_size, (list, tuple)) else [output_size] * len(sizes)
    )
    outs = [s if o is None else int(o) for s, o in zip(sizes, wanted, strict=True)]
    if any(o <= 0 or s % o for s, o in zip(sizes, outs, strict=True)):
        return None
    return [s // o for s, o in zip(sizes, outs, strict=True)]


# --- ops with no integer kernel in edgequant's export, and what a fully integer target offers --
# (op name, the replacement or None, why)
_LUT = (
    "integer runtimes run it as a 256-entry int8 lookup table (TFLite); edgequant's integer "
    "export and run_integer have no lookup-table op"
)
# Bilinear upsampling (F.interpolate / nn.Upsample, align_corners False or True), measured with
# litert-torch 0.10: converted to int8 RESIZE_BILINEAR, which TFLite Micro and LiteRT's reference
# kernels run alike (tensorflow/lite/kernels/internal/reference/resize_bilinear.h, int8 path).
BILINEAR_WHY = (
    "TFLite has an int8 RESIZE_BILINEAR (litert-torch writes it, TFLite Micro runs it), but it "
    "interpolates the stored int8 values in fixed point (source positions on a 1/1024 grid, the "
    "weighted sum rounded half away from zero back onto the input's grid), which edgequant's "
    "simulation and integer reference do not compute: no file with it can be proven bit-exact. "
    "Nearest upsampling (mode='nearest') exports exactly (a change of function: fine-tune or "
    "QAT afterwards)"
)
NOT_INTEGER: dict[str, tuple[str | None, str]] = {
    "upsample (bilinear)": (None, BILINEAR_WHY),
    "gelu": (
        "nn.ReLU",
        "the usual integer stand-in (changes the function: fine-tune or QAT afterwards); " + _LUT,
    ),
    "silu": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "hardswish": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "mish": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "elu": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "leaky_relu": ("nn.ReLU", "changes the function: fine-tune or QAT afterwards; " + _LUT),
    "tanh": (
        "nn.Hardtanh(-1, 1)",
        "a clamp, folded into the quantizer's range (changes the function: fine-tune or QAT "
        "afterwards); " + _LUT,
    ),
    "sigmoid": (None, _LUT),
    "softmax": (None, "int8 softmax needs exp lookup tables; edgequant's export has none"),
    "log_softmax": (None, "int8 softmax needs exp lookup tables; edgequant's export has none"),
    "layer_norm": (
        None,
        "normalising by a data-dependent standard deviation needs an integer square root and "
        "division per sample (no int8 kernel in CMSIS-NN); a BatchNorm (folded) in its place "
        "means retraining",
    ),
    "batch_norm": (
        None,
        "not right after a conv/linear, so it cannot be folded; an integer port would run it "
        "as a per-channel multiply-add, which the export has no kernel for",
    ),
    "group_norm": (None, "per-sample normalisation: no int8 kernel (see layer_norm)"),
    "instance_norm": (None, "per-sample normalisation: no int8 kernel (see layer_norm)"),
    "mul": (None, "an elementwise product of activations: no integer kernel in the export"),
    "sub": (None, "no integer subtraction kernel in the export"),
    "div": (None, "no integer division kernel in the export"),
    "matmul": (None, "a product of two activations: no integer kernel in the export"),
    "exp": (None, "no integer kernel"),
    "pow": (None, "no integer kernel"),
    "sqrt": (None, "no integer kernel"),
    "attention": (None, "softmax and activation products: no integer kernel in the export"),
}
MONOTONIC_AT_OUTPUT = {"softmax", "log_softmax", "sigmoid"}
# PyTorch's transformer blocks: attention, norms and activations inside one module call.
BLOCKS = (
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)

NAMED_MODULES: dict[type[nn.Module], str] = {
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Mish: "mish",
    nn.ELU: "elu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Softmax: "softmax",
    nn.LogSoftmax: "log_softmax",
    nn.LayerNorm: "layer_norm",
    nn.GroupNorm: "group_norm",
    nn.InstanceNorm1d: "instance_norm",
    nn.InstanceNorm2d: "instance_norm",
    nn.MultiheadAttention: "attention",
}
NAMED_FUNCTIONS: dict[Any, str] = {
    F.gelu: "gelu",
    F.silu: "silu",
    F.hardswish: "hardswish",
    F.mish: "mish",
    F.elu: "elu",
    F.leaky_relu: "leaky_relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.log_softmax: "log_softmax",
    F.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.truediv: "div",
    torch.div: "div",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    torch.exp: "exp",
    torch.pow: "pow",
    operator.pow: "pow",
    torch.sqrt: "sqrt",
    torch.rsqrt: "sqrt",
}
NAMED_METHODS = {
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "mul": "mul",
    "sub": "sub",
    "div": "div",
    "matmul": "matmul",
    "exp": "exp",
    "pow": "pow",
    "sqrt": "sqrt",
    "rsqrt": "sqrt",
}

# ONNX op types (for check_onnx): integer ones, then named non-integer ones.
ONNX_INTEGER = {
    "Conv": "conv",
    "Gemm": "linear",
    "MatMul": "linear",
    "Add": "add",
    "Relu": "relu",
    "Clip": "clamp",
    "MaxPool": "maxpool",
    "AveragePool": "avgpool",
    "GlobalAveragePool": "avgpool",
    "ReduceMean": "avgpool",
    "Concat": "concat",
    "Reshape": "reshape",
    "Flatten": "reshape",
    "Squeeze": "reshape",
    "Unsqueeze": "reshape",
    "Transpose": "transpose",
    "Slice": "slice",
    "Pad": "pad",
    "Resize": "upsample (nearest)",
    "Identity": "identity",
    "Dropout": "identity (eval)",
    "BatchNormalization": "batchnorm (folded into the layer before it)",
    "Gather": "embedding",
}
# ONNX ops that read only a tensor's shape: no computation on its values.
SHAPE_ONLY_ONNX = ("Shape", "Size")
ONNX_NAMED = {
    "Gelu": "gelu",
    "Erf": "gelu",
    "Sigmoid": "sigmoid",
    "HardSigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softmax": "softmax",
    "LogSoftmax": "log_softmax",
    "LayerNormalization": "layer_norm",
    "GroupNormalization": "group_norm",
    "InstanceNormalization": "instance_norm",
    "HardSwish": "hardswish",
    "Mish": "mish",
    "Elu": "elu",
    "LeakyRelu": "leaky_relu",
    "Mul": "mul",
    "Sub": "sub",
    "Div": "div",
    "Exp": "exp",
    "Pow": "pow",
    "Sqrt": "sqrt",
}


# Library classes of the same ops (transformers' GELUActivation, NewGELU, ...), by class name.
NAME_HINTS = (
    ("gelu", "gelu"),
    ("hardswish", "hardswish"),
    ("silu", "silu"),
    ("swish", "silu"),
    ("mish", "mish"),
    ("layernorm", "layer_norm"),
    ("rmsnorm", "layer_norm"),
    ("softmax", "softmax"),
    ("sigmoid", "sigmoid"),
    ("tanh", "tanh"),
)


def module_op(m: nn.Module) -> str:
    """The op a module computes: its entry in the tables, a hint from its class name, or the
    class name itself (unknown: refused on fully integer targets)."""
    if isinstance(m, nn.Upsample):
        return f"upsample ({m.mode})"
    named = NAMED_MODULES.get(type(m))
    if named is not None:
        return named
    lowered = type(m).__name__.lower()
    for hint, op in NAME_HINTS:
        if hint in lowered:
            return op
    return type(m).__name__
