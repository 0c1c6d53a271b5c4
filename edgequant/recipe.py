"""How a model is quantized (Recipe): default weight and activation specs, per-layer overrides,
skips, the hardware target and the PTQ/QAT switches. A frozen dataclass that validates itself
and round-trips to YAML."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgequant import _yaml
from edgequant._io import atomic_write_text
from edgequant.spec import (
    MAX_BITS,
    MIN_BITS,
    OVERRIDE_KEYS,
    LayerOverride,
    QuantSpec,
    activation_spec,
    check_dataclass_keys,
    weight_spec,
)
from edgequant.targets import TARGETS

ROUNDINGS = ("auto", "nearest", "adaround", "gptq", "block")
ROUNDING_TARGETS = ("auto", "float", "quantized")
RANGE_LEARNING = ("ema", "pact", "lsq", "lsq+")
DYNAMIC_ACTIVATIONS = ("token", "tensor")

_PRESET_RE = re.compile(r"^w(\d+)a(\d+)$")
_WEIGHT_ONLY_RE = re.compile(r"^w(\d+)-weight-only$")
PRESET_FORMS = "'w{B}a{B}' (e.g. 'w8a8', 'w4a8', 'w4a4') or 'w{B}-weight-only' (e.g. 'w4-weight-only'), B in 2..16"


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model: default weight and activation specs, per-layer overrides, skips.

    activation=None means weight-only. `first_last_bits` keeps the first and last quantized layer
    at that many bits (the literature keeps them at 8 when the rest is lower).
    """

    name: str = "custom"
    weight: QuantSpec | None = field(default_factory=lambda: weight_spec(8))
    activation: QuantSpec | None = field(default_factory=lambda: activation_spec(8))
    overrides: tuple[LayerOverride, ...] = ()
    skip: tuple[str, ...] = ()
    first_last_bits: int | None = None
    target: str = "onnxruntime"
    calib_samples: int = 512
    # Quantize layer outputs that do not flow straight into another quantized layer, so that
    # integer runtimes keep those layers in integer kernels (see instrument.add_output_quantizers).
    quantize_outputs: bool = True
    # Static PTQ (and QAT from it): the matmuls of two activations (attention's Q·Kᵀ and P·V,
    # F.scaled_dot_product_attention written out) take both operands on the activation grid,
    # so a transformer runs them as integer matmuls (edgequant/attention.py); False: float.
    quantize_attention: bool = True
    # SmoothQuant's migration strength for Linear inputs (PTQ, static and dynamic): a number
    # applies to every Linear input; "auto": on each input with outlier channels (calibration
    # data shows a few channels with ranges above ptq.outliers.OUTLIER_RATIO times the median
    # channel range: ptq.outliers.has_outliers), the alpha
    # (or none) whose quantized layer output has the least error, other inputs untouched
    # (ptq/smoothquant.py); None: off. Without calib_data, "auto" is off.
    smooth_alpha: float | str | None = "auto"
    # Outlier channel splitting of Linear inputs quantized per tensor (PTQ, static and dynamic):
    # channels whose range exceeds this quantile of the layer's per-channel ranges are repeated,
    # each copy carrying its share (ptq/smoothquant.py); a number: every such input; "auto": the
    # inputs with outlier channels (as for smooth_alpha), at ptq.outliers.AUTO_SPLIT_QUANTILE;
    # None: off. 0.99 adds about 1 % of columns.
    split_outliers: float | str | None = "auto"
    # --- the PTQ pipeline (ptq/): None or "auto" lets the bits and the model decide (on at <= 4
    # weight bits, and at 8 bits where calibration finds Linear inputs with outlier channels);
    # the quantized model's quant_info["pipeline"] records what ran and why.
    # Cross-layer equalization with bias absorption (Nagel et al. 2019).
    equalize: bool | None = None
    # Empirical bias correction of the quantized layers' output mean.
    bias_correction: bool | None = None
    # Weight rounding: "nearest", "adaround", "gptq", "block" (BRECQ-style: the layers of each
    # block learn their rounding together against the float block output; torch.fx models only),
    # or "auto".
    rounding: str = "auto"
    # What learned rounding reconstructs: "float", the float model's output of the layer (so the
    # layer also absorbs the error of its quantized input, as GPTAQ / Qronos do); "quantized",
    # the layer's float weight applied to its own quantized input (plain GPTQ / AdaRound);
    # "auto": "float" when activations are 4-bit or coarser or any weight is 3-bit or coarser,
    # "quantized" otherwise (held-out choices on ResNet-20 W2A8-W4A8 and all-MiniLM-L6-v2 INT4;
    # edgequant/ptq/static.py resolve_pipeline).
    rounding_target: str = "auto"
    # GPTQ's damping (x its Hessian's mean diagonal); None, "auto": ptq/gptq.py damping.
    gptq_damp: float | None = None
    # 7-bit weights where an 8-bit layer meets 8-bit unsigned activations (the onnxruntime
    # target): x86 CPUs without VNNI run such a layer in a u8s8 kernel whose int16 pair sums
    # saturate unless |weight| <= 64, so 8-bit weights are stored as UINT8 for the exact, slower
    # u8u8 kernel. None ("auto"): each such layer gets 7 bits, GPTQ-rounded, where that output
    # error is no larger than its 8-bit rounding's (static PTQ with calibration data;
    # ptq/reduce_range.py); True: every such layer; False: none.
    reduce_range: bool | None = None
    # Weight-only PTQ of a decoder stack (a causal LM: most quantized Linears in one stack of
    # repeated blocks) at <= 4 weight bits runs block by block (ptq/decoder.py): AWQ scaling
    # (Lin et al. 2023) and the clipping search by output error, each True, False or None
    # ("auto": on there, off elsewhere).
    awq: bool | None = None
    clip_search: bool | None = None
    # ... and the refit of each row's scales to GPTQ's codes by output error (ptq/scale_refit.py;
    # None, "auto": off, it raised held-out perplexity where it was measured).
    scale_refit: bool | None = None
    # Weight-only causal LM: Linear inputs rounded to int8 per token and block (amax / 127) as
    # ONNX Runtime's MatMulNBits at accuracy_level=4 (its fast CPU path, which the LM export
    # writes): "all" (True), "lm_head" (only it: token-exact verification), False; None, auto:
    # "all" in a LLaMA-style LM at <= 4 bits for onnxruntime (ptq/weight_only.py block_int8_rule).
    block_int8_inputs: bool | str | None = None
    # --- QAT (qat/): how quantization ranges train: "ema", "pact", "lsq" or "lsq+".
    range_learning: str = "lsq"
    # Dynamic PTQ: the activation grid computed at run time for each Linear input: "token", one
    # scale and zero point per row (per token of a transformer; an outlier token no longer
    # coarsens every other token's grid), or "tensor", one for the whole input (ONNX Runtime's
    # DynamicQuantizeLinear, one fused op).
    dynamic_activation: str = "token"

    def __post_init__(self) -> None:
        self._check_specs()
        self._check_switches()
        self._check_lists()

    def _check_specs(self) -> None:
        """The name, the default specs and first_last_bits."""
        if not isinstance(self.name, str):
            raise TypeError(f"Recipe.name must be a string, got {self.name!r}")
        if self.weight is None and self.activation is None:
            raise ValueError("Recipe needs a weight spec, an activation spec or both; got neither")
        for label, spec in (("weight", self.weight), ("activation", self.activation)):
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(
                    f"Recipe.{label} must be a QuantSpec or None, got {type(spec).__name__}"
                )
        if self.first_last_bits is not None and (
            not isinstance(self.first_last_bits, int)
            or isinstance(self.first_last_bits, bool)
            or not MIN_BITS <= self.first_last_bits <= MAX_BITS
        ):
            raise ValueError(
                f"Recipe.first_last_bits={self.first_last_bits!r} must be an int in "
                f"{MIN_BITS}..{MAX_BITS} or None"
            )

    def _check_switches(self) -> None:
        """The target and the PTQ/QAT switches, each against its valid choices."""
        if not isinstance(self.target, str) or self.target not in TARGETS:
            raise ValueError(
                f"Recipe.target={self.target!r} is unknown; known targets: {', '.join(TARGETS)}"
            )
        if self.smooth_alpha is not None and not (
            self.smooth_alpha == "auto"
            or (
                isinstance(self.smooth_alpha, (int, float))
                and not isinstance(self.smooth_alpha, bool)
                and 0.0 <= self.smooth_alpha <= 1.0
            )
        ):
            raise ValueError(
                f"Recipe.smooth_alpha={self.smooth_alpha!r} must be in [0, 1], 'auto' or None"
            )
        if (
            self.split_outliers is not None
            and self.split_outliers != "auto"
            and not (
                isinstance(self.split_outliers, (int, float))
                and not isinstance(self.split_outliers, bool)
                and 0.0 < self.split_outliers < 1.0
            )
        ):
            raise ValueError(
                f"Recipe.split_outliers={self.split_outliers!r} must be a quantile in (0, 1), "
                "'auto' or None"
            )
        for label, valid in (
            ("rounding", ROUNDINGS),
            ("rounding_target", ROUNDING_TARGETS),
            ("range_learning", RANGE_LEARNING),
            ("dynamic_activation", DYNAMIC_ACTIVATIONS),
        ):
            if getattr(self, label) not in valid:
                raise ValueError(
                    f"Recipe.{label}={getattr(self, label)!r} is unknown; valid: {', '.join(valid)}"
                )
        if self.gptq_damp is not None and not (
            isinstance(self.gptq_damp, (int, float))
            and not isinstance(self.gptq_damp, bool)
            and self.gptq_damp > 0
        ):
            raise ValueError(f"Recipe.gptq_damp={self.gptq_damp!r} must be > 0 or None (auto)")
        for label in (
            "equalize",
            "bias_correction",
            "reduce_range",
            "awq",
            "clip_search",
            "scale_refit",
            "block_int8_inputs",
        ):
            scopes = ("all", "lm_head") if label == "block_int8_inputs" else ()
            if getattr(self, label) not in (None, True, False, *scopes):
                raise ValueError(
                    f"Recipe.{label} must be {''.join(f'{v!r}, ' for v in scopes)}true, false or "
                    f"null (auto), got {getattr(self, label)!r}"
                )
        for label in ("quantize_outputs", "quantize_attention"):
            if not isinstance(getattr(self, label), bool):
                raise TypeError(
                    f"Recipe.{label} must be true or false, got {getattr(self, label)!r}"
                )
        if (
            not isinstance(self.calib_samples, int)
            or isinstance(self.calib_samples, bool)
            or self.calib_samples < 1
        ):
            raise ValueError(
                f"Recipe.calib_samples must be a positive int, got {self.calib_samples!r}"
            )

    def _check_lists(self) -> None:
        """skip and overrides: lists of the right items, stored as tuples."""
        # A bare string would become a tuple of its characters, a bare LayerOverride or None
        # fail in tuple(): both must come in a list.
        if not isinstance(self.skip, (list, tuple)) or not all(
            isinstance(p, str) for p in self.skip
        ):
            raise TypeError(
                f"Recipe.skip must be a list of module name globs or type names, got {self.skip!r}"
            )
        if not isinstance(self.overrides, (list, tuple)):
            raise TypeError(
                f"Recipe.overrides must be a list of LayerOverride, got "
                f"{type(self.overrides).__name__}"
            )
        # Tuples keep the dataclass hashable and immutable even when built from lists.
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "skip", tuple(self.skip))
        for ov in self.overrides:
            if not isinstance(ov, LayerOverride):
                raise TypeError(
                    f"Recipe.overrides must hold LayerOverride, got {type(ov).__name__}"
                )

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    @classmethod
    def preset(cls, name: str) -> Recipe:
        """'w8a8', 'w4a8', 'w4a4', ..., or 'w4-weight-only'."""
        if not isinstance(name, str):
            raise TypeError(f"Recipe.preset expects a name string, got {type(name).__name__}")
        m = _PRESET_RE.match(name)
        wo = _WEIGHT_ONLY_RE.match(name)
        if m is None and wo is None:
            raise ValueError(f"unknown preset {name!r}: valid forms are {PRESET_FORMS}")
        w_bits = int((m or wo).group(1))  # type: ignore[union-attr]
        a_bits = int(m.group(2)) if m else None
        for label, bits in (("weight", w_bits), ("activation", a_bits)):
            if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(
                    f"preset {name!r}: {label} bits {bits} out of range; valid forms are {PRESET_FORMS}"
                )
        lowest = min(w_bits, a_bits if a_bits is not None else w_bits)
        # Below 8 bits the clipping range matters: ranges that minimise the quantization error
        # (MSE search) beat min/max (measured on ResNet-20, held-out images: BENCHMARKS.md).
        w_spec = weight_spec(w_bits)
        if w_bits < 8:
            w_spec = w_spec.replace(observer="mse")
        return cls(
            name=name,
            weight=w_spec,
            activation=(
                activation_spec(a_bits, "mse" if a_bits < 8 else "minmax")
                if a_bits is not None
                else None
            ),
            first_last_bits=8 if lowest < 8 else None,
        )

    def for_target(self, target: str) -> Recipe:
        """This recipe under `target`'s grid rules (TARGETS): bit widths, observers and
        first_last_bits are kept; weight, activation and override specs are rewritten."""
        if not isinstance(target, str) or target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)}")
        rules = TARGETS[target]

        def w(spec: QuantSpec | None) -> QuantSpec | None:
            return rules.weight(spec) if spec is not None else None

        def a(spec: QuantSpec | None) -> QuantSpec | None:
            return rules.activation(spec) if spec is not None else None

        overrides = tuple(
            dataclasses.replace(ov, weight=w(ov.weight), activation=a(ov.activation))
            for ov in self.overrides
        )
        return dataclasses.replace(
            self,
            weight=w(self.weight),
            activation=a(self.activation),
            overrides=overrides,
            target=rules.name,
        )

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def specs_for(
        self, name: str, module_type: str
    ) -> tuple[QuantSpec | None, QuantSpec | None, str | None]:
        """(weight spec, activation spec, skip reason) for one layer, overrides applied in order."""
        for pattern in self.skip:
            if pattern == module_type or fnmatch.fnmatchcase(name, pattern):
                return None, None, f"in the recipe's skip list ({pattern!r})"
        weight, activation = self.weight, self.activation
        for ov in self.overrides:
            if ov.matches(name, module_type):
                if ov.skip:
                    return None, None, f"skipped by override {ov.pattern!r}"
                weight = ov.weight if ov.weight is not None else weight
                activation = ov.activation if ov.activation is not None else activation
        return weight, activation, None

    def __str__(self) -> str:
        lines = [f"Recipe {self.name!r} (target {self.target})"]
        lines.append(f"  weights:     {self.weight.short() if self.weight else 'float'}")
        lines.append(
            f"  activations: {self.activation.short() if self.activation else 'float (weight-only)'}"
        )
        if self.first_last_bits is not None:
            lines.append(f"  first and last quantized layers kept at {self.first_last_bits} bits")
        for ov in self.overrides:
            what = (
                "skip"
                if ov.skip
                else ", ".join(
                    f"{k}={s.short()}"
                    for k, s in (("weight", ov.weight), ("activation", ov.activation))
                    if s
                )
            )
            lines.append(f"  override {ov.pattern}: {what}")
        if self.skip:
            lines.append(f"  skip: {', '.join(self.skip)}")
        if self.smooth_alpha == "auto":
            lines.append("  SmoothQuant on Linear inputs with outlier channels, alpha per layer")
        elif self.smooth_alpha is not None:
            lines.append(f"  SmoothQuant on Linear inputs, alpha {self.smooth_alpha}")
        if self.split_outliers == "auto":
            lines.append("  outlier channel splitting of Linear inputs with outlier channels")
        elif self.split_outliers is not None:
            lines.append(
                f"  outlier channel splitting of Linear inputs above the {self.split_outliers} "
                "quantile of their channel ranges"
            )
        lines.append(f"  calibration samples: {self.calib_samples}")
        lines.append(f"  dynamic PTQ activations: per {self.dynamic_activation}")
        if self.activation is not None:
            lines.append(
                f"  layer outputs quantized where no quantized layer reads them: {self.quantize_outputs}"
            )
            lines.append(
                f"  attention matmuls (two activations) quantized: {self.quantize_attention}"
            )
        return "\n".join(lines)

    # --- YAML round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight.to_dict() if self.weight else None,
            "activation": self.activation.to_dict() if self.activation else None,
            "overrides": [
                {
                    "pattern": o.pattern,
                    "weight": o.weight.to_dict() if o.weight else None,
                    "activation": o.activation.to_dict() if o.activation else None,
                    "skip": o.skip,
                }
                for o in self.overrides
            ],
            "skip": list(self.skip),
            "first_last_bits": self.first_last_bits,
            "target": self.target,
            "calib_samples": self.calib_samples,
            "quantize_outputs": self.quantize_outputs,
            "quantize_attention": self.quantize_attention,
            "smooth_alpha": self.smooth_alpha,
            "split_outliers": self.split_outliers,
            "equalize": self.equalize,
            "bias_correction": self.bias_correction,
            "rounding": self.rounding,
            "rounding_target": self.rounding_target,
            "gptq_damp": self.gptq_damp,
            "reduce_range": self.reduce_range,
            "awq": self.awq,
            "clip_search": self.clip_search,
            "scale_refit": self.scale_refit,
            "block_int8_inputs": self.block_int8_inputs,
            "range_learning": self.range_learning,
            "dynamic_activation": self.dynamic_activation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        check_dataclass_keys(cls, data)
        d = dict(data)

        def spec(v: Any) -> QuantSpec | None:
            return QuantSpec.from_dict(v) if v is not None else None

        # A key left out takes the field's default, as every other key does: a recipe that
        # gives only `weight` keeps the default activations (`activation: null` is weight-only).
        for label in ("weight", "activation"):
            if label in d:
                d[label] = spec(d[label])
        overrides = d.get("overrides") or []  # `overrides:` with no value is YAML null
        if not isinstance(overrides, list):
            raise TypeError(
                f"Recipe.overrides must be a list of mappings with a 'pattern', got {overrides!r}"
            )
        parsed = []
        for index, o in enumerate(overrides):
            if not isinstance(o, dict) or "pattern" not in o:
                raise TypeError(
                    f"Recipe.overrides[{index}] must be a mapping with a 'pattern' (and "
                    f"optionally {', '.join(OVERRIDE_KEYS[1:])}), got {o!r}"
                )
            unknown = set(o) - set(OVERRIDE_KEYS)
            if unknown:
                raise ValueError(
                    f"Recipe.overrides[{index}] ({o['pattern']!r}): unknown keys "
                    f"{sorted(unknown)}; valid: {', '.join(OVERRIDE_KEYS)}"
                )
            parsed.append(
                LayerOverride(
                    pattern=o["pattern"],
                    weight=spec(o.get("weight")),
                    activation=spec(o.get("activation")),
                    skip=o.get("skip", False),
                )
            )
        d["overrides"] = tuple(parsed)
        if "skip" in d and d["skip"] is None:
            d["skip"] = ()
        return cls(**d)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            if Path(path).is_dir():
                raise IsADirectoryError(
                    f"Recipe.to_yaml: {path} is a folder; give a file path, e.g. "
                    f"{Path(path) / (self.name + '.yaml')}"
                )
            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> Recipe:
        """From a YAML file path, or a YAML string (one with a newline). A key given twice in
        one mapping is refused (PyYAML would keep the last silently)."""
        if isinstance(source, str) and "\n" in source:
            text, where = source, "the YAML text"
        elif not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                f"Recipe.from_yaml expects a file path or YAML text, got {type(source).__name__}"
            )
        else:
            path = Path(source)
            if path.is_dir():
                raise IsADirectoryError(f"recipe path {path} is a folder, not a YAML file")
            if not path.is_file():
                hint = (
                    " (YAML text needs a newline: a single line is read as a file path)"
                    if isinstance(source, str) and ": " in source
                    else ""
                )
                raise FileNotFoundError(f"recipe file not found: {path}{hint}")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} is not a YAML text file (not UTF-8: {err})") from err
            where = str(path)
        try:
            data = _yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{where} is not valid YAML: {err}") from err
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from err
