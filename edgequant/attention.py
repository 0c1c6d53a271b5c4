"""Attention's matmuls of two activations (Q·Kᵀ and P·V) quantized, however the model writes them:
`q @ k.transpose(-2, -1)`, torch.matmul / torch.bmm / torch.baddbmm, or
F.scaled_dot_product_attention (Hugging Face's "sdpa" and "eager" attention, PyTorch's
nn.MultiheadAttention and nn.TransformerEncoderLayer, hand-written attention).

One calibration batch is run with a torch function mode that sees every such call and the module
whose forward makes it (its host). Each host gets `quant_matmuls`, one quantized op per call
(modules.QuantMatMul, or modules.QuantScaledDotProductAttention for the fused function, which is
written out so that both of its matmuls are quantized: the softmax stays float), and hooks that
route its calls to them in order while it runs. A torch.fx graph (place_graph_quantizers' output)
has its matmul nodes replaced by calls of those modules instead: hooks do not survive a copy of a
graph module.
"""

from __future__ import annotations

import operator
import types
from typing import Any, cast

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from edgequant.batches import call_model, removing_hooks
from edgequant.modules import QuantMatMul, QuantMixin, QuantScaledDotProductAttention
from edgequant.quantizer import TensorQuantizer
from edgequant.spec import QuantSpec
from edgequant.summary import Summary

HOLDER = "quant_matmuls"

# The float ops of two activations that get a quantized form, by what they compute.
MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm}
BADDBMMS = {torch.baddbmm, Tensor.baddbmm}
SDPA = torch_F.scaled_dot_product_attention
# Ops of two activations with no quantized form here: listed in the summary as float.
LEFT_FLOAT = {torch.einsum: "einsum", Tensor.__rmatmul__: "matmul"}

# nn.MultiheadAttention's function, as PyTorch writes it, minus its override check: a torch
# function mode sees only the outermost call of a function that has one, and this one calls
# scaled_dot_product_attention (or bmm) inside. torch is pinned, so the copy is its own code.
_MHA = torch_F.multi_head_attention_forward
_MHA_BODY = types.FunctionType(
    _MHA.__code__,
    {**_MHA.__globals__, "has_torch_function": lambda *_: False},
    _MHA.__name__,
    _MHA.__defaults__,
    _MHA.__closure__,
)
_MHA_BODY.__kwdefaults__ = _MHA.__kwdefaults__


def _activation(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point() and not isinstance(x, nn.Parameter)


def op_kind(func: Any, args: tuple[Any, ...]) -> str | None:
    """ "matmul", "baddbmm", "sdpa" (ops of two activations that get a quantized form), "float"
    (two activations, no quantized form), or None (not an op between two activations)."""
    if func is SDPA:
        return "sdpa" if len(args) >= 3 and all(_activation(a) for a in args[:3]) else None
    if func is torch.einsum:  # (equation, *operands) or (equation, [operands])
        tensors = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        return "float" if sum(_activation(t) for t in tensors) >= 2 else None
    operands = args[1:3] if func in BADDBMMS else args[:2]
    if len(operands) < 2 or not all(_activation(a) for a in operands):
        return None
    if func in MATMULS:
        return "matmul"
    if func in BADDBMMS:
        return "baddbmm"
    return "float" if func in LEFT_FLOAT else None


def _func_name(func: Any) -> str:
    return LEFT_FLOAT.get(func) or str(getattr(func, "__name__", func))


class _OpMode(TorchFunctionMode):
    """Hands every torch call, with its op_kind, to `handle`; nn.MultiheadAttention's body runs
    under the mode, so that the matmuls inside it reach `handle` too."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _MHA:
            with self:
                return _MHA_BODY(*args, **kwargs)
        return self.handle(func, op_kind(func, args), args, kwargs)

    def handle(self, func: Any, kind: str | None, args: Any, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError


class _Discovery(_OpMode):
    """Records (host module name, kind, op name) for every op between two activations."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.calls: list[tuple[str, str, str]] = []

    def handle(self, func: Any, kind: str | None, args: Any, kwargs: dict[str, Any]) -> Any:
        if kind is not None and self.stack and not self.stack[-1].endswith("#inner"):
            self.calls.append((self.stack[-1], kind, _func_name(func)))
        return func(*args, **kwargs)


def _pop(stack: list[str]) -> None:
    stack.pop()  # a forward hook that returned the name would replace the module's output


def discover(model: nn.Module, batch: Any) -> list[tuple[str, str, str]]:
    """(host, kind, op) of each op between two activations that one run of `batch` makes, in
    order; host is the innermost module running it ("" for the model's own forward)."""
    stack: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        # Inside a quantized layer or quantizer nothing is attention.
        inner = isinstance(
            m, (QuantMixin, TensorQuantizer, QuantMatMul, QuantScaledDotProductAttention)
        )
        label = f"{name}#inner" if inner else name
        hooks.append(m.register_forward_pre_hook(lambda *_, n=label: stack.append(n)))
        hooks.append(m.register_forward_hook(lambda *_: _pop(stack), always_call=True))
    mode = _Discovery(stack)
    with removing_hooks(hooks), torch.no_grad(), mode:
        call_model(model, batch)
    return mode.calls


class _Router(_OpMode):
    """While its host runs: its k-th op between two activations goes to quant_matmuls[k]."""

    def __init__(self, ops: nn.ModuleList) -> None:
        super().__init__()
        self.ops = ops
        self.next = 0

    def handle(self, func: Any, kind: str | None, args: Any, kwargs: dict[str, Any]) -> Any:
        if kind not in ("matmul", "baddbmm", "sdpa") or self.next >= len(self.ops):
            return func(*args, **kwargs)  # an op the calibration run did not make stays float
        op = self.ops[self.next]
        if (kind == "sdpa") != isinstance(op, QuantScaledDotProductAttention):
            return func(*args, **kwargs)  # not the op calibration saw here: float
        self.next += 1
        if kind == "sdpa":
            return op(*args, **kwargs)
        if kind == "matmul":
            return op(args[0], args[1])
        bias, x, other = args[:3]
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        product = op(x, other)
        return (bias if beta == 1 else bias * beta) + (product if alpha == 1 else product * alpha)


def _enter_router(module: nn.Module, args: Any) -> None:
    router = _Router(cast(nn.ModuleList, getattr(module, HOLDER)))
    router.__enter__()
    module.__dict__.setdefault("_quant_routers", []).append(router)


def _exit_router(module: nn.Module, args: Any, output: Any) -> None:
    module.__dict__["_quant_routers"].pop().__exit__(None, None, None)


def _new_op(kind: str, spec: QuantSpec, name: str, func: str) -> nn.Module:
    if kind == "sdpa":
        return QuantScaledDotProductAttention(spec, name)
    return QuantMatMul(spec, name, func)


def _rewrite_graph(gm: torch.fx.GraphModule, spec: QuantSpec) -> list[str]:
    """The matmul and scaled_dot_product_attention nodes of two activations in gm's own graph
    call quantized modules (gm.quant_matmuls.<k>); returns their names."""
    graph_matmuls = {torch.matmul, operator.matmul, torch.bmm}
    if hasattr(gm, HOLDER):
        return []
    ops, names = nn.ModuleList(), []
    gm.add_module(HOLDER, ops)
    for node in list(gm.graph.nodes):
        is_sdpa = node.op == "call_function" and node.target is SDPA
        is_mm = (node.op == "call_function" and node.target in graph_matmuls) or (
            node.op == "call_method" and node.target in ("matmul", "bmm", "__matmul__")
        )
        operands = node.args[:3] if is_sdpa else node.args[:2]
        if not (is_sdpa or is_mm) or not all(
            isinstance(a, torch.fx.Node) and a.op != "get_attr" for a in operands
        ):
            continue
        name = f"{HOLDER}.{len(ops)}"
        func = (
            "scaled_dot_product_attention"
            if is_sdpa
            else str(getattr(node.target, "__name__", node.target))
        )
        ops.append(_new_op("sdpa" if is_sdpa else "matmul", spec, name, func))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, node.args, node.kwargs if is_sdpa else {})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        names.append(f"{node.name} ({func})")
    if ops:
        gm.graph.lint()
        gm.recompile()
    else:
        delattr(gm, HOLDER)
    return names


def quantize_attention_(
    qmodel: nn.Module, spec: QuantSpec, batch: Any, summary: Summary
) -> nn.Module:
    """Quantize qmodel's matmuls of two activations in place on `spec`'s grid (per tensor); the
    summary lists each, and each op of two activations left in float with its reason."""
    if not spec.per_tensor:
        summary.notes.append(
            f"attention matmuls kept in float: the activation grid {spec.short()} is not per "
            "tensor, and an integer matmul takes one scale per operand"
        )
        return qmodel
    quantized: list[str] = []
    if isinstance(qmodel, torch.fx.GraphModule):
        quantized += [f"graph {n}" for n in _rewrite_graph(qmodel, spec)]
    calls = discover(qmodel, batch)
    hosts: dict[str, list[tuple[str, str]]] = {}
    for host, kind, func in calls:
        hosts.setdefault(host, []).append((kind, func))
    left: list[str] = []
    for host, found in hosts.items():
        left += [
            f"{host or 'the model'}: {func} (no quantized form)"
            for kind, func in found
            if kind == "float"
        ]
        ops = [(kind, func) for kind, func in found if kind != "float"]
        why = _why_float(qmodel, host, hosts)
        if why is not None:
            left += [f"{host or 'the model'}: {func} ({why})" for _, func in ops]
            continue
        if not ops:
            continue
        module = qmodel.get_submodule(host)
        prefix = f"{host}.{HOLDER}" if host else HOLDER
        holder = nn.ModuleList(
            _new_op(kind, spec, f"{prefix}.{k}", func) for k, (kind, func) in enumerate(ops)
        )
        module.add_module(HOLDER, holder)
        module.register_forward_pre_hook(_enter_router)
        module.register_forward_hook(_exit_router, always_call=True)
        quantized += [f"{prefix}.{k} ({func})" for k, (_, func) in enumerate(ops)]
    if quantized:
        summary.notes.append(
            f"attention matmuls quantized ({len(quantized)}; both operands per tensor on "
            f"{spec.short()}, the softmax between them float): " + ", ".join(quantized)
        )
    if left:
        summary.notes.append("ops of two activations left in float: " + "; ".join(left))
    return qmodel


def _why_float(qmodel: nn.Module, host: str, hosts: dict[str, Any]) -> str | None:
    """Why a host's ops stay float, or None."""
    if any(other != host and (other.startswith(f"{host}.") or not host) for other in hosts):
        return "a module inside it has attention matmuls too: nested hosts are not routed"
    if hasattr(qmodel.get_submodule(host), HOLDER):
        return f"it already has an attribute {HOLDER!r}"
    return None


def note_float_attention(qmodel: nn.Module, batch: Any, summary: Summary, why: str) -> None:
    """The summary lists the ops of two activations that one run of `batch` makes, as float for
    the reason `why` (a method that does not quantize them); no batch: nothing to list."""
    if batch is None:
        return
    calls = discover(qmodel, batch)
    if calls:
        summary.notes.append(
            f"ops of two activations left in float ({why}): "
            + ", ".join(f"{host or 'the model'}: {func}" for host, _, func in calls)
        )
