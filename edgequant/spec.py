"""Quantization specifications: what a tensor's integer grid is (QuantSpec) and the settings of
one layer (LayerOverride). Frozen dataclasses that validate themselves and round-trip to YAML."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

GRANULARITIES = ("tensor", "channel", "group")
SCALE_TYPES = ("float", "pow2")
# The range estimators a QuantSpec may name; observers.OBSERVERS implements exactly these.
OBSERVER_NAMES = ("minmax", "ema", "percentile", "mse", "entropy", "auto")
MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid of one tensor.

    granularity: "tensor" (one scale), "channel" (one scale per index of `axis`) or "group"
    (one scale per `group_size` consecutive elements along `axis`, per index of the other dims).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "tensor"
    axis: int = 0
    group_size: int | None = None
    scale_type: str = "float"
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise TypeError(f"QuantSpec.bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"QuantSpec.bits={self.bits} is out of range: valid bits are {MIN_BITS}..{MAX_BITS}"
            )
        for label in ("signed", "symmetric", "narrow_range"):
            if not isinstance(getattr(self, label), bool):
                # A string such as 'false' from a quoted YAML value would be truthy.
                raise TypeError(
                    f"QuantSpec.{label} must be true or false, got {getattr(self, label)!r}"
                )
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise TypeError(f"QuantSpec.axis must be an int (a tensor dim), got {self.axis!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
        ):
            raise TypeError(f"QuantSpec.group_size must be an int or None, got {self.group_size!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity={self.granularity!r} is unknown; valid: {', '.join(GRANULARITIES)}"
            )
        if self.scale_type not in SCALE_TYPES:
            raise ValueError(
                f"QuantSpec.scale_type={self.scale_type!r} is unknown; valid: {', '.join(SCALE_TYPES)}"
            )
        if self.granularity == "group":
            if self.group_size is None or self.group_size < 1:
                raise ValueError(
                    f"QuantSpec granularity 'group' needs group_size >= 1, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} is only valid with granularity 'group'"
            )
        if self.narrow_range and not self.signed:
            raise ValueError(
                "QuantSpec.narrow_range applies to signed grids only (-(2^(b-1)-1)..2^(b-1)-1)"
            )
        if not isinstance(self.observer, str) or self.observer not in OBSERVER_NAMES:
            raise ValueError(
                f"QuantSpec.observer={self.observer!r} is unknown; valid: "
                f"{', '.join(OBSERVER_NAMES)}"
            )

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def per_tensor(self) -> bool:
        return self.granularity == "tensor"

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        """A compact human name, e.g. 'int4 sym per-channel(0)'."""
        kind = ("int" if self.signed else "uint") + str(self.bits)
        gran = {
            "tensor": "per-tensor",
            "channel": f"per-channel({self.axis})",
            "group": f"per-group({self.group_size}, axis {self.axis})",
        }[self.granularity]
        extra = " narrow" if self.narrow_range else ""
        extra += " pow2-scale" if self.scale_type == "pow2" else ""
        return f"{kind} {'sym' if self.symmetric else 'asym'} {gran}{extra} [{self.observer}]"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        check_dataclass_keys(cls, data)
        return cls(**data)


def check_dataclass_keys(cls: type, data: Any) -> None:
    """What `cls.from_dict(data)` checks first: `data` is a dict whose keys are all fields of the
    dataclass `cls` (TypeError / ValueError naming the class, the unknown and the valid keys)."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")


def weight_spec(bits: int, group_size: int | None = None) -> QuantSpec:
    """The literature's default for weights: symmetric, per output channel (axis 0)."""
    if group_size is not None:
        return QuantSpec(
            bits=bits,
            signed=True,
            symmetric=True,
            granularity="group",
            axis=1,
            group_size=group_size,
            observer="minmax",
        )
    return QuantSpec(
        bits=bits, signed=True, symmetric=True, granularity="channel", axis=0, observer="minmax"
    )


def activation_spec(bits: int, observer: str = "minmax") -> QuantSpec:
    """The literature's default for activations: asymmetric (unsigned) per tensor."""
    return QuantSpec(
        bits=bits, signed=False, symmetric=False, granularity="tensor", observer=observer
    )


OVERRIDE_KEYS = ("pattern", "weight", "activation", "skip")


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer settings. `pattern` is a module name glob ('layer1.*.conv1') or a type name
    ('Linear'). A None spec keeps the recipe's; skip=True leaves the layer in float."""

    pattern: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise TypeError(
                f"LayerOverride.pattern must be a non-empty module name glob or type name, "
                f"got {self.pattern!r}"
            )
        for label in ("weight", "activation"):
            spec = getattr(self, label)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(
                    f"LayerOverride({self.pattern!r}).{label} must be a QuantSpec or None, "
                    f"got {type(spec).__name__}"
                )
        if not isinstance(self.skip, bool):
            raise TypeError(
                f"LayerOverride({self.pattern!r}).skip must be true or false, got {self.skip!r}"
            )

    def matches(self, name: str, module_type: str) -> bool:
        return self.pattern == module_type or fnmatch.fnmatchcase(name, self.pattern)
