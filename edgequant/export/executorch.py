"""Export a quantized model as an ExecuTorch program (.pte, XNNPACK backend), verified in
ExecuTorch's own runtime against the simulation.

Route: the PT2E form of the model on edgequant's own grids with int8 weight tensors
(export/pt2e.py) -> `to_edge_transform_and_lower` with the XNNPACK partitioner -> `.pte`.
XNNPACK runs the int8 convs, linears, adds and pools; ops it does not take run in ExecuTorch's
portable kernels. Its requantization is float arithmetic, so verification compares the
runtime's outputs with the simulation's by SQNR and top-1 agreement (as for ONNX Runtime), not
bit for bit. Channel padding (`F.pad` over channels, the option-A shortcut of CIFAR ResNets) is
kept out of the delegate: XNNPACK's constant pad fails on it at load time or computes wrong.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgequant._io import atomic_path
from edgequant.batches import run_checked, split_inputs
from edgequant.export.lower import ExportError
from edgequant.export.pt2e import export_program, nodes_of, pt2e_model
from edgequant.export.tflite import EdgeExportInfo, EdgeVerification, check_edge_args
from edgequant.export.tflite_runtime import silenced
from edgequant.export.verify import Comparison

# Ops left in the program that ExecuTorch's lowering refuses (not in its core ATen set), named
# before any lowering; adaptive max pools of whole windows were rewritten (export/pt2e.py).
NO_EXECUTORCH_FORM = frozenset({"aten.adaptive_max_pool1d", "aten.adaptive_max_pool2d"})


def lower_to_executorch(program: torch.export.ExportedProgram, xnnpack: bool = True) -> bytes:
    """The .pte bytes of an exported program, its int8 (or float) ops delegated to XNNPACK."""
    import executorch.kernels.quantized  # noqa: F401  (quantize/dequantize outside the delegate)
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        ConstantPadConfig,
    )
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    configs = [c for c in ALL_PARTITIONER_CONFIGS if c is not ConstantPadConfig]
    partitioner = [XnnpackPartitioner(configs=configs)] if xnnpack else []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edge = to_edge_transform_and_lower(program, partitioner=partitioner)
            return bytes(edge.to_executorch().buffer)
    except Exception as err:  # the lowering raises many types; say which stage failed
        raise ExportError(
            f"ExecuTorch could not lower the program: {type(err).__name__}: {err}"
        ) from err


def _program(qmodel: nn.Module, one: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """The PT2E program ExecuTorch lowers (XNNPACK's form), ExportError naming every op that has
    no form in ExecuTorch's core ATen set, before any lowering."""
    program = export_program(
        pt2e_model(qmodel, int8_weights=True), one, int8_weights=True, concat_grid=True
    )
    refused = nodes_of(program, NO_EXECUTORCH_FORM)
    if refused:
        raise ExportError(
            f"{len(refused)} ops have no form in ExecuTorch's core ATen set (nothing was "
            "lowered): " + "; ".join(refused[:5]) + " (an adaptive max pool exports when "
            "each input size is a whole multiple of its output size)"
        )
    return program


class ExecuTorchRunner:
    """A .pte's forward method in ExecuTorch's runtime, sample by sample (batch 1)."""

    def __init__(self, program: bytes) -> None:
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        # ExecuTorch reads the program from this buffer without holding a reference to it:
        # freed, the method runs on whatever reuses the memory (wrong shapes, then a crash).
        self.program_bytes = program
        with silenced():
            self.program = Runtime.get().load_program(program)
            self.method = self.program.load_method("forward")

    def run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        n = xs[0].shape[0]
        outs: list[list[np.ndarray]] = []
        for i in range(n):
            result = self.method.execute([torch.from_numpy(x[i : i + 1]) for x in xs])
            outs.append([r.detach().numpy().copy() for r in result])
        return [np.concatenate([o[k] for o in outs], axis=0) for k in range(len(outs[0]))]


def delegated_ops(program: bytes) -> int:
    """How many XNNPACK delegate calls the program holds (0: nothing was delegated)."""
    # The flatbuffer names each delegate by its backend id.
    return program.count(b"XnnpackBackend")


def export_executorch(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    verify_data: Iterable[Any] | None = None,
    min_top1_agreement: float = 0.995,
    min_sqnr_db: float = 30.0,
) -> EdgeExportInfo:
    """Write qmodel as an ExecuTorch program (.pte, XNNPACK backend, batch size 1) at `path`,
    after running it in ExecuTorch's runtime on example_inputs and verify_data and comparing it
    with the simulation (SQNR >= min_sqnr_db; top-1 agreement >= min_top1_agreement for
    classifiers). Nothing is written unless it verifies (ExportError).

    Any target's grids export when they are 8-bit activations and symmetric weights; the
    `executorch` target gives XNNPACK's own (int8 asymmetric activations, int8 symmetric
    per-channel weights).
    """
    path, verify = check_edge_args(qmodel, path, example_inputs, verify_data, ".pte")
    for name, value in (("min_top1_agreement", min_top1_agreement), ("min_sqnr_db", min_sqnr_db)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= min_top1_agreement <= 1.0:
        raise ValueError(f"min_top1_agreement must be in [0, 1], got {min_top1_agreement!r}")
    training = {m: m.training for m in qmodel.modules()}
    try:
        qmodel.eval()
        run_checked(qmodel, example_inputs, "example_inputs")
        start = time.perf_counter()
        args, _ = split_inputs(example_inputs)
        one = tuple(a[:1] for a in args)
        pte = lower_to_executorch(_program(qmodel, one))
        if not delegated_ops(pte):
            raise ExportError("XNNPACK took no op of the model: the program would run in float")
        try:
            runner = ExecuTorchRunner(pte)
        except Exception as err:
            raise ExportError(
                f"ExecuTorch cannot load the program: {type(err).__name__}: {err}"
            ) from err
        compare = Comparison()
        v = EdgeVerification(runtimes=["ExecuTorch (XNNPACK)"], reference="the simulation")
        for batch in [example_inputs] + verify:
            bargs, _ = split_inputs(batch)
            xs = [a.detach().float().cpu().numpy() for a in bargs]
            with torch.no_grad():
                sim = qmodel(*bargs)
            ref = [sim] if isinstance(sim, Tensor) else list(sim)
            got = [torch.from_numpy(o) for o in runner.run(xs)]
            classify = ref[0].dim() == 2 and ref[0].shape[1] > 1
            compare.add([r.float() for r in ref], got, classify)
            v.samples += xs[0].shape[0]
        v.sqnr_db = compare.sqnr_db
        v.top1_agreement = compare.agreement
        problems = []
        if v.sqnr_db < min_sqnr_db:
            problems.append(f"SQNR {v.sqnr_db:.1f} dB < {min_sqnr_db:.1f} dB")
        if v.top1_agreement is not None and v.top1_agreement < min_top1_agreement:
            problems.append(f"top-1 agreement {v.top1_agreement:.4f} < {min_top1_agreement:.4f}")
        v.conclude(problems, ".pte")
        with atomic_path(path, suffix=".pte.tmp") as tmp:
            tmp.write_bytes(pte)
    finally:
        for m, flag in training.items():
            m.training = flag
    return EdgeExportInfo.of_file(
        qmodel,
        path,
        "pte",
        pte,
        ops=[f"XNNPACK delegate x{delegated_ops(pte)}"],
        verification=v,
        wall_s=time.perf_counter() - start,
    )
