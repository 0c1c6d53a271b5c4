"""What the check found (CheckResult, one OpRow per op instance a target cannot run in integer),
the row for one op, and the target looked up by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgequant.check.ops import (
    KEEP_FLOAT,
    MONOTONIC_AT_OUTPUT,
    NOT_INTEGER,
    REFUSE,
    REMOVE,
    REPLACE,
)
from edgequant.targets import TARGETS


@dataclass(frozen=True)
class OpRow:
    """One op instance the target cannot run in integer."""

    node: str  # module path or graph node name
    op: str  # the op, e.g. "gelu", "layer_norm"
    action: str  # keep-float, replace, remove or refuse
    choice: str  # the choice spelled out for this target


@dataclass
class CheckResult:
    """What `check` found: the rows to act on, and what runs in integer as it is."""

    target: str
    fully_integer: bool
    rows: list[OpRow] = field(default_factory=list)
    integer_ops: dict[str, int] = field(default_factory=dict)
    traced_with: str = "torch.fx"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The model goes to the target as it is (every other op runs in integer, or in float
        where the target allows)."""
        return all(r.action == KEEP_FLOAT for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def format(self) -> str:
        kind = "fully integer" if self.fully_integer else "integer layers, float allowed between"
        head = f"check for target {self.target} ({kind}), traced with {self.traced_with}: "
        head += (
            "OK, the model can be quantized for this target as it is"
            if self.ok
            else "NOT OK, change the model first"
        )
        lines = [head]
        if self.integer_ops:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.integer_ops.items()))
            lines.append(f"  runs in integer: {ops}")
        if not self.rows:
            lines.append("  no op outside the target's integer set")
        width = max((len(r.node) for r in self.rows), default=0)
        for r in self.rows:
            lines.append(f"  {r.node:<{width}}  {r.op:<12} {r.action:<10} {r.choice}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    __str__ = format


def op_row(node: str, op: str, fully_integer: bool, target: str, at_output: bool) -> OpRow:
    replacement, why = NOT_INTEGER.get(op, (None, "no integer kernel known for this op"))
    if not fully_integer:
        return OpRow(
            node,
            op,
            KEEP_FLOAT,
            f"kept in float: {target}'s export runs it between DequantizeLinear and "
            "QuantizeLinear (an integer-only port would need it replaced)",
        )
    if at_output and op in MONOTONIC_AT_OUTPUT:
        return OpRow(
            node,
            op,
            REMOVE,
            "it produces the model's output and is monotonic: drop it (top-1 is the argmax "
            "of the logits) and apply it on the host in float if probabilities are needed",
        )
    if replacement is not None:
        return OpRow(node, op, REPLACE, f"replace with {replacement}: {why}")
    return OpRow(node, op, REFUSE, f"{target} cannot run it: {why}")


def uneven_pool_row(node: str, op: str, sizes: list[int], output_size: Any, target: str) -> OpRow:
    """The refusal of an adaptive max pool whose windows differ in size (`sizes` of the input,
    `output_size` asked for) on a target whose files have no adaptive max pool."""
    return OpRow(
        node,
        f"{op} (uneven windows)",
        REFUSE,
        f"{target}'s files (.tflite, .pte) have no adaptive max pool, and a max pool of fixed "
        f"windows computes it only where each input size is a whole multiple of its output "
        f"size: input {'x'.join(map(str, sizes))}, output size {output_size!r}; change the "
        "output size (or the input size) so that it divides, or use F.max_pool with a fixed "
        "kernel",
    )


def target_spec(target: str) -> Any:
    if not isinstance(target, str):
        hint = f" (this recipe's is {target.target!r})" if hasattr(target, "target") else ""
        raise TypeError(
            f"target must be a target name, one of {', '.join(TARGETS)}{hint}; "
            f"got {type(target).__name__}"
        )
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[target]
