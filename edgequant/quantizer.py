"""TensorQuantizer: one tensor's spec, its observer and its scale/zero-point buffers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from edgequant import functional as F
from edgequant.observers import OBSERVERS
from edgequant.spec import QuantSpec

MODES = ("disabled", "observe", "quantize", "dynamic")


class TensorQuantizer(nn.Module):
    """Fake-quantizes a tensor on the grid of `spec`.

    Modes: "observe" records statistics and passes x through unchanged (calibration);
    "quantize" fake-quantizes with the stored scale/zero point; "dynamic" computes the
    parameters from each tensor at run time (per tensor, or per token where `per_token`: one
    scale and zero point for each row of the last dimension); "disabled" passes x through.
    """

    # Buffers, registered in __init__.
    scale: Tensor
    zero_point: Tensor

    def __init__(self, spec: QuantSpec, name: str = "", role: str = "activation") -> None:
        super().__init__()
        if role not in ("activation", "weight"):
            raise ValueError(f"TensorQuantizer role must be 'activation' or 'weight', got {role!r}")
        self.role = role
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"TensorQuantizer needs a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.name = name
        self.observer = OBSERVERS[spec.observer](spec)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.mode = "disabled"
        self.per_token = False

    @property
    def axis(self) -> int | None:
        return None if self.spec.per_tensor else self.spec.axis

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def set_spec(self, spec: QuantSpec) -> None:
        """Move to another grid: a fresh observer for `spec`, uncalibrated (disabled) until it is
        calibrated again."""
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"{self.name}: set_spec needs a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.observer = OBSERVERS[spec.observer](spec)
        self.scale = torch.empty(0, device=self.scale.device)
        self.zero_point = torch.empty(0, dtype=torch.int32, device=self.zero_point.device)
        self.mode = "disabled"

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"{self.name}: unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if mode == "quantize" and not self.calibrated:
            raise RuntimeError(f"{self.name}: cannot quantize before calibration (no scale yet)")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "disabled":
            return x
        if self.mode == "observe":
            try:
                self.observer(x)
            except ValueError as err:
                if "NaN" not in str(err):
                    # A spec that does not fit this tensor (an axis out of range, a group size
                    # that does not divide the dim): name the quantizer and its spec.
                    raise ValueError(
                        f"{self.name!r} ({self.role} quantizer, {self.spec.short()}): {err}"
                    ) from err
                raise ValueError(
                    f"layer {self.name!r}: calibration produced NaN or Inf in this tensor "
                    f"(check the calibration data and the layers before it): {err}"
                ) from err
            return x
        if self.mode == "dynamic":
            return F.dynamic_fake_quantize(x, self.spec.qmin, self.spec.qmax, self.per_token)
        return self.fake_quantize_stored(x)

    def fake_quantize_stored(self, x: Tensor) -> Tensor:
        """x fake-quantized on the stored grid (self.scale, self.zero_point) of this spec."""
        return F.fake_quantize(
            x,
            self.scale,
            self.zero_point,
            self.spec.qmin,
            self.spec.qmax,
            self.axis,
            self.spec.group_size,
        )

    def set_range(self, min_val: Tensor, max_val: Tensor) -> None:
        """Fix scale and zero point from a range (per tensor, channel or group)."""
        scale, zero_point = F.calc_qparams(
            min_val,
            max_val,
            self.spec.qmin,
            self.spec.qmax,
            self.spec.symmetric,
            pow2=self.spec.scale_type == "pow2",
        )
        self.scale = scale.to(self.scale.device)
        self.zero_point = zero_point.to(self.scale.device)

    def compute_qparams(self) -> None:
        """Scale and zero point from what the observer saw."""
        try:
            min_val, max_val = self.observer.compute_range()
        except RuntimeError as err:
            raise ValueError(
                f"layer {self.name!r}: no calibration data reached this quantizer"
            ) from err
        self.set_range(min_val, max_val)

    def calibrate_tensor(self, x: Tensor) -> None:
        """Observe one whole tensor (a weight) and fix the parameters from it."""
        with torch.no_grad():
            self.observer(x.detach())
        self.compute_qparams()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Buffers start empty (scale) or per tensor (observer ranges) and take the calibrated
        # shape on load, here and in the observer.
        for name, buf in list(self.named_buffers()):
            key = prefix + name
            if key in state_dict and buf is not None and buf.shape != state_dict[key].shape:
                owner_name, _, leaf = name.rpartition(".")
                owner = self.get_submodule(owner_name) if owner_name else self
                setattr(owner, leaf, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # The mode travels with the state dict, so a loaded model computes what the saved one did.
    def get_extra_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "per_token": self.per_token}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mode = state.get("mode", "disabled") if isinstance(state, dict) else "disabled"
        if mode not in MODES:
            raise ValueError(
                f"{self.name}: saved mode {mode!r} is unknown; valid: {', '.join(MODES)}"
            )
        self.mode = mode
        self.per_token = bool(state.get("per_token", False)) if isinstance(state, dict) else False

    def extra_repr(self) -> str:
        rows = ", per token" if self.per_token else ""
        return f"{self.spec.short()}, mode={self.mode}{rows}"


def quantizers(model: nn.Module) -> Iterator[TensorQuantizer]:
    for m in model.modules():
        if isinstance(m, TensorQuantizer):
            yield m


@contextlib.contextmanager
def calibration_mode(model: nn.Module, which: tuple[str, ...] = ("activation",)) -> Iterator[None]:
    """Switch activation quantizers to observing; restore every mode on exit, even on error."""
    saved = {q: q.mode for q in quantizers(model)}
    try:
        for q in saved:
            if q.role in which:
                q.mode = "observe"
        yield
    finally:
        for q, mode in saved.items():
            q.mode = mode
