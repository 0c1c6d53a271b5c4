"""Export a fake-quantized model as an ONNX QDQ model with integer weights, verified in ONNX Runtime.

Route (DESIGN §4): the quantized layers are lowered to modules that call edgequant's custom ops
(export/lower.py, export/ops.py) on *stored integer* weights; the dynamo exporter at opset 21
translates those ops to QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear +
MatMulInteger; graph passes (export/passes.py) fold the INT4 casts into packed INT4
initializers; the model is run in ONNX Runtime against the simulation (export/verify.py) and
only then moved into place.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgequant._io import atomic_path
from edgequant.batches import (
    batch_list,
    check_batch_values,
    in_eval_mode,
    input_tensors,
    run_checked,
    split_inputs,
)
from edgequant.export import ops
from edgequant.export.int8_kernels import resolve_weight_storage, u8s8_saturates_here
from edgequant.export.integer_graph import (
    fold_activations_into_quantizers,
    fully_integer_violations,
    merge_slices,
    quantize_around_pools,
    quantize_inputs_first,
)
from edgequant.export.lower import WEIGHT_STORAGE, ExportError, lower, quiet_exporter
from edgequant.export.passes import (
    drop_default_attributes,
    drop_value_info,
    fold_integer_casts,
    integer_weight_count,
    requantize_after_moves,
    strip_metadata,
)
from edgequant.export.verify import Verification, verify_onnx
from edgequant.instrument import quant_layers
from edgequant.quantizer import TensorQuantizer
from edgequant.targets import TARGETS

__all__ = ["OPSET", "ExportError", "ExportInfo", "export_float_onnx", "export_onnx"]

OPSET = 21


@dataclass
class ExportInfo:
    path: str
    size_bytes: int
    float_params_bytes: int
    size_ratio: float
    quantized_layers: int
    integer_weights: int
    verification: Verification = field(default_factory=Verification)
    wall_s: float = 0.0
    opset: int = OPSET
    # Fully integer targets (spec.Target.fully_integer): the graph property was checked and
    # holds (every compute node reads DequantizeLinear outputs and feeds QuantizeLinear);
    # None for other targets, which do not ask for it.
    fully_integer: bool | None = None
    # The weight storage the file was written with ("exact" or "int8": "auto" resolved on this
    # CPU) and how many layers keep INT8 weights with |w| > 64 beside UINT8 activations: exact
    # on CPUs with VNNI or Arm dot products, saturated on x86 without VNNI (the file says so in
    # its metadata, U8S8_METADATA_KEY).
    weight_storage: str = "exact"
    u8s8_wide_layers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        v = self.verification
        agree = f", top-1 agreement {v.top1_agreement:.4f}" if v.top1_agreement is not None else ""
        return (
            f"wrote {self.path}: {self.size_bytes} bytes ({self.size_ratio:.3f}x the float parameters), "
            f"{self.integer_weights} integer weight tensors for {self.quantized_layers} quantized layers; "
            f"verified in ONNX Runtime on {v.samples} samples: SQNR {v.sqnr_db:.1f} dB "
            f"(float-rounding floor {v.floor_sqnr_db:.1f} dB){agree}"
            + (
                f"; {len(v.weights_run_as_uint8)} INT8 weight tensors beside INT8 activations "
                "ran as UINT8 + 128: ONNX Runtime on this CPU (x86 without VNNI) converts INT8 "
                "activations to UINT8 and would saturate its u8s8 kernel on the file as written, "
                "which int8 runtimes (TFLite, TensorRT, CMSIS-NN, ONNX Runtime on Arm) compute "
                "exactly"
                if v.weights_run_as_uint8
                else ""
            )
            + (f"; {_u8s8_note(self.u8s8_wide_layers)}" if self.u8s8_wide_layers else "")
        )


U8S8_METADATA_KEY = "edgequant.int8_weights"


def _u8s8_note(layers: int) -> str:
    """What a file with INT8 weights that could saturate a u8s8 kernel runs exactly on."""
    return (
        f"{layers} layers keep INT8 weights with |w| > 64 beside UINT8 activations (ONNX "
        "Runtime's faster u8s8 kernel): exact on x86 CPUs with VNNI and on Arm, where this file "
        "was verified; they saturate on x86 CPUs without VNNI (AVX2): for such a CPU export "
        "with weight_storage='exact'"
    )


def _dynamic_dims(t: Any) -> Any:
    if not isinstance(t, Tensor) or t.dim() == 0:
        return None
    dims = {0: torch.export.Dim.AUTO}
    if not t.is_floating_point() and t.dim() == 2:
        dims[1] = torch.export.Dim.AUTO  # token ids and masks: variable sequence length
    return dims


def _to_onnx(model: nn.Module, example_inputs: Any, **options: Any) -> Any:
    """The dynamo exporter's ModelProto of `model` (opset 21, dynamic batch and sequence length)."""
    args, kwargs = split_inputs(example_inputs)
    dynamic_shapes: Any = (
        {k: _dynamic_dims(v) for k, v in kwargs.items()}
        if kwargs
        else tuple(_dynamic_dims(a) for a in args)
    )
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs or None,
            dynamo=True,
            opset_version=OPSET,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            **options,
        )
    assert program is not None
    return program.model_proto


def export_float_onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any) -> None:
    """The float model as ONNX (opset 21, one file, dynamic batch and sequence length): the
    baseline that quantized exports are compared with."""
    import onnx

    model_proto = _to_onnx(model, example_inputs)
    # Without the exporter's provenance and shape annotations, as export_onnx writes its files:
    # the size ratio of a quantized export to this file compares like with like.
    strip_metadata(model_proto)
    drop_value_info(model_proto)
    with atomic_path(path, suffix=".onnx.tmp") as tmp:
        onnx.save_model(model_proto, str(tmp))


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    verify_data: Iterable[Any] | None = None,
    min_top1_agreement: float = 0.995,
    min_sqnr_db: float = 30.0,
    weight_storage: str = "auto",
) -> ExportInfo:
    """Write qmodel as an ONNX QDQ model (opset 21) at `path`, after proving in ONNX Runtime that
    it computes what the simulation computes (on example_inputs and on verify_data when given).

    weight_storage: "exact" stores the 8-bit weights of a layer with uint8 inputs as UINT8 with
    zero point 128 wherever some |w| > 64, so ONNX Runtime runs its u8u8 kernel, exact on every
    CPU. "int8" keeps them INT8: ONNX Runtime's faster u8s8 kernel (about 2x), exact only on
    CPUs with VNNI (AVX-VNNI, AVX512-VNNI) or Arm dot-product instructions; on x86 without VNNI
    it saturates, and verification, which runs on this machine, refuses the file. "auto"
    (default) is "int8" where this machine runs it exactly and "exact" elsewhere: the file is
    exact and fast on the CPU that exports it; where it keeps such INT8 weights, ExportInfo
    and the file's metadata (key "edgequant.int8_weights") say which CPUs run it exactly.

    Nothing is written if export or verification fails (ExportError); an existing file at `path`
    is replaced only by a verified model.
    """
    layers = _check_qmodel(qmodel)
    _check_settings(weight_storage, min_top1_agreement, min_sqnr_db)
    path = _check_path(path)
    verify = _check_batches(example_inputs, verify_data)
    # Export and verification need eval mode; the caller's flags come back at the end (STYLE §9).
    with in_eval_mode(qmodel):
        run_checked(qmodel, example_inputs, "example_inputs")
        return _export(
            qmodel,
            path,
            example_inputs,
            verify,
            min_top1_agreement,
            min_sqnr_db,
            weight_storage,
            layers,
        )


def _check_qmodel(qmodel: Any) -> list[tuple[str, nn.Module]]:
    """qmodel's quantized layers; TypeError / ValueError if it has nothing calibrated to export."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    layers = list(quant_layers(qmodel))
    if not layers:
        raise ValueError(
            "qmodel has no quantized layer: run edgequant.quantize (or prepare_qat) first"
        )
    for name, layer in layers:
        if getattr(layer, "input_block_int8", None) is not None:
            raise ValueError(
                f"layer {name!r}: its input is rounded to int8 per block at run time "
                "(Recipe.block_int8_inputs), which only the causal-LM export writes "
                "(edgequant.export.lm.export_lm_onnx: MatMulNBits at accuracy_level=4); quantize "
                "with block_int8_inputs=False to export it here"
            )
    modes = [q.mode for q in qmodel.modules() if isinstance(q, TensorQuantizer)]
    if "observe" in modes:
        raise ValueError(
            "qmodel still has quantizers observing (calibration did not finish): quantize it with "
            "edgequant.quantize first"
        )
    if not any(m in ("quantize", "dynamic") for m in modes):
        raise ValueError(
            "no quantizer of qmodel is active (uncalibrated or all disabled): there is nothing "
            "integer to export; use edgequant.quantize first"
        )
    return layers


def _check_settings(weight_storage: Any, min_top1_agreement: Any, min_sqnr_db: Any) -> None:
    if weight_storage not in WEIGHT_STORAGE:
        raise ValueError(
            f"weight_storage must be one of {', '.join(map(repr, WEIGHT_STORAGE))}, "
            f"got {weight_storage!r}"
        )
    for name, value, low, high in (
        ("min_top1_agreement", min_top1_agreement, 0.0, 1.0),
        ("min_sqnr_db", min_sqnr_db, -math.inf, math.inf),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not low <= value <= high:
            raise ValueError(
                f"{name} must be "
                + ("a fraction in [0, 1]" if name == "min_top1_agreement" else "a finite number")
                + f", got {value!r}"
            )


def _check_path(path: Any) -> Path:
    """`path` as a Path to a .onnx file in an existing folder (ValueError / TypeError if not)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    if path.exists() and path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{str(path.parent)!r}, the folder of path, is a file, not a folder")
    if not path.parent.exists():
        raise ValueError(f"the folder {str(path.parent)!r} does not exist")
    return path


def _check_batches(example_inputs: Any, verify_data: Iterable[Any] | None) -> list[Any]:
    """verify_data as a list, after checking it and example_inputs (dtype, NaN, empty)."""
    for pos, t in input_tensors(example_inputs):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise TypeError(
                f"example_inputs{pos} has dtype {t.dtype}; the exported model takes float32 "
                "inputs (its scales are float32): pass it as .float()"
            )
    check_batch_values(example_inputs, "example_inputs")
    verify = batch_list(verify_data, "verify_data") if verify_data is not None else []
    for i, batch in enumerate(verify):
        check_batch_values(batch, f"verify_data[{i}]")  # refuses a batch of the wrong kind too
    return verify


def _export(
    qmodel: nn.Module,
    path: Path,
    example_inputs: Any,
    verify: list[Any],
    min_top1_agreement: float,
    min_sqnr_db: float,
    weight_storage: str,
    layers: list[tuple[str, nn.Module]],
) -> ExportInfo:
    import onnx

    start = time.perf_counter()
    weight_storage = resolve_weight_storage(weight_storage)
    lowered = lower(qmodel, weight_storage)
    wide = sum(1 for m in lowered.modules() if getattr(m, "u8s8_wide", False))
    try:
        model = _to_onnx(
            lowered,
            example_inputs,
            custom_translation_table=ops.translation_table(),
            optimize=True,
        )
    except Exception as err:  # the exporter raises many types; say which stage failed
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    _check_integer_inputs(model)
    fold_integer_casts(model)
    strip_metadata(model)
    drop_default_attributes(model)
    fully_integer = _fully_integer_target(qmodel)
    if fully_integer:
        _make_fully_integer(model, fully_integer)
    requantize_after_moves(model)
    integer, quantized = _check_integer_weights(model, layers)
    drop_value_info(model)
    if wide:
        onnx.helper.set_model_props(model, {U8S8_METADATA_KEY: _u8s8_note(wide)})
    onnx.checker.check_model(model)
    with atomic_path(path, suffix=".onnx.tmp") as tmp:
        onnx.save_model(model, str(tmp))
        batches = [example_inputs] + verify
        batch_names = ["example_inputs"] + [f"verify_data[{i}]" for i in range(len(verify))]
        v = verify_onnx(
            tmp, qmodel, batches, min_top1_agreement, min_sqnr_db, batch_names=batch_names
        )
        if not v.passed:
            raise _refusal(v, weight_storage)
        size = tmp.stat().st_size
    float_bytes = sum(4 * p.numel() for p in qmodel.parameters())
    return ExportInfo(
        path=str(path),
        size_bytes=size,
        float_params_bytes=float_bytes,
        size_ratio=size / max(float_bytes, 1),
        quantized_layers=quantized,
        integer_weights=integer,
        verification=v,
        wall_s=time.perf_counter() - start,
        fully_integer=True if fully_integer else None,
        weight_storage=weight_storage,
        u8s8_wide_layers=wide,
    )


def _make_fully_integer(model: Any, target: str) -> None:
    """Rewrite the graph so that every edge between compute nodes is integer (ExportError if
    some edge stays float), as the fully integer `target` needs."""
    for rewrite in (
        merge_slices,
        quantize_inputs_first,
        fold_activations_into_quantizers,
        quantize_around_pools,
    ):
        rewrite(model)
    problems = fully_integer_violations(model)
    if problems:
        raise ExportError(
            f"target {target} needs a fully integer graph, and {len(problems)} "
            f"edges of this one are float (run edgequant check first): " + "; ".join(problems[:5])
        )


def _check_integer_weights(model: Any, layers: list[tuple[str, nn.Module]]) -> tuple[int, int]:
    """(integer weight tensors in the graph, quantized layers); ExportError if some quantized
    weight is stored as float."""
    integer, float_dq = integer_weight_count(model)
    quantized = sum(
        1
        for _, m in layers
        if m.weight_quantizer is not None and m.weight_quantizer.mode == "quantize"
    )
    if float_dq or integer < quantized:
        raise ExportError(
            f"the exported graph does not store every quantized weight as integers "
            f"({integer} integer weights for {quantized} quantized layers; float: {float_dq[:5]})"
        )
    return integer, quantized


def _refusal(v: Verification, weight_storage: str) -> ExportError:
    """The error for a file that did not verify, with a hint where the CPU explains it."""
    hint = ""
    if weight_storage == "int8" and u8s8_saturates_here():
        hint = (
            " (weight_storage='int8' on an x86 CPU without VNNI, where ONNX Runtime's "
            "u8s8 kernel saturates: export with weight_storage='exact', or on a CPU "
            "like the one you deploy to)"
        )
    return ExportError(
        f"the exported model does not compute what the simulation computes: {v.reason}"
        f"{hint}; nothing was written"
    )


def _check_integer_inputs(model: Any) -> None:
    """ValueError for a graph input of an integer type that a QuantizeLinear reads: the
    simulation quantizes integer example inputs as floats, ONNX Runtime refuses the graph."""
    from onnx import TensorProto

    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        if elem in (TensorProto.FLOAT, TensorProto.UNDEFINED):
            continue
        if any(
            n.op_type == "QuantizeLinear" and n.input[:1] == [value.name] for n in model.graph.node
        ):
            raise ValueError(
                f"example_inputs: the model's input {value.name!r} is "
                f"{TensorProto.DataType.Name(elem).lower()}, and its first layer quantizes it "
                "as float activations: pass it as a float32 tensor (.float())"
            )


def _fully_integer_target(qmodel: nn.Module) -> str | None:
    """The name of qmodel's target when that target is fully integer (mcu-int8), else None."""
    summary = getattr(qmodel, "quant_summary", None)
    target = TARGETS.get(getattr(summary, "target", ""))
    return target.name if target is not None and target.fully_integer else None
