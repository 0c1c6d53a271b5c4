"""Verification: run an exported ONNX file in ONNX Runtime beside the simulation on the same
batches, and compare (SQNR, top-1 agreement) against the simulation's own float-rounding floor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgequant.batches import describe_batch, run_checked, split_inputs
from edgequant.export.int8_kernels import u8s8_saturates_here
from edgequant.export.lower import ExportError
from edgequant.export.passes import exact_kernel_model
from edgequant.instrument import quant_layers


def ort_feed(names: list[str], batch: Any) -> dict[str, Any]:
    """One batch of model inputs as ONNX Runtime's feed: keyword tensors by name, positional
    tensors in order."""
    args, kwargs = split_inputs(batch)
    positional = [a for a in args if isinstance(a, Tensor)]
    feed: dict[str, Any] = {}
    for i, name in enumerate(names):
        t = kwargs.get(name) if name in kwargs else (positional[i] if i < len(positional) else None)
        if t is None:
            raise ExportError(f"no input for the ONNX model's input {name!r} in this batch")
        feed[name] = t.detach().cpu().numpy()
    return feed


def _outputs(out: Any) -> list[Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, Tensor)]


def exact_session(onnx_path: str | os.PathLike[str], options: Any = None) -> tuple[Any, list[str]]:
    """An ONNX Runtime CPU session that computes what an exported model means, and the INT8
    weights it runs as UINT8 + 128: on x86 CPUs without VNNI, of exact_kernel_model's copy
    (signed-activation targets), elsewhere of the file itself. What verification runs; a
    measurement of a signed-target export's deployed metric on this machine should run it too.
    """
    import onnx
    import onnxruntime as ort

    source: Any = str(onnx_path)
    names: list[str] = []
    if u8s8_saturates_here():
        exact, names = exact_kernel_model(onnx.load(str(onnx_path)))
        if names:
            source = exact.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session, names


@dataclass
class Verification:
    """How the deployed model compares with the simulation.

    floor_*: the same comparison between the simulation and itself with every quantized layer's
    input perturbed by one part in 10^7 (float rounding noise). A deep network whose
    activations are rounded to a coarse grid amplifies such noise: a value within rounding
    error of a step boundary lands on the other side, and the change spreads. The runtime adds
    exactly this kind of noise (other summation orders, fused kernels), so the deployed model
    cannot agree with the simulation better than the floor; it must agree about as well.
    """

    samples: int = 0
    top1_agreement: float | None = None
    sqnr_db: float = float("inf")
    max_abs_err: float = 0.0
    floor_top1_agreement: float | None = None
    floor_sqnr_db: float = float("inf")
    required_sqnr_db: float = 0.0
    required_top1_agreement: float | None = None
    passed: bool = False
    reason: str = ""
    # INT8 weights that ran as UINT8 + 128 in verification (exact_kernel_model): this CPU's
    # ONNX Runtime would saturate on them; the file keeps them INT8.
    weights_run_as_uint8: list[str] = field(default_factory=list)


class Comparison:
    """Accumulates SQNR, max error and top-1 agreement of output lists, batch by batch."""

    def __init__(self) -> None:
        self.signal: list[float] = []
        self.noise: list[float] = []
        self.agree = self.compared = 0
        self.max_abs_err = 0.0

    def add(self, ref: list[Tensor], test: list[Tensor], classify: bool) -> None:
        if len(ref) != len(test):
            raise ExportError(f"ONNX model has {len(test)} outputs, the PyTorch model {len(ref)}")
        if not self.signal:
            self.signal, self.noise = [0.0] * len(ref), [0.0] * len(ref)
        for k, (r, t) in enumerate(zip(ref, test, strict=False)):
            if r.shape != t.shape:
                raise ExportError(
                    f"output {k}: ONNX Runtime gave shape {tuple(t.shape)}, the simulation {tuple(r.shape)}"
                )
            r64, t64 = r.double(), t.double()
            self.signal[k] += float(r64.pow(2).sum())
            self.noise[k] += float((r64 - t64).pow(2).sum())
            if r.numel():
                self.max_abs_err = max(self.max_abs_err, float((r64 - t64).abs().max()))
        if classify:
            self.agree += int((ref[0].argmax(1) == test[0].argmax(1)).sum())
            self.compared += int(ref[0].shape[0])

    @property
    def sqnr_db(self) -> float:
        return min(
            (
                float("inf") if n == 0 else 10 * math.log10(max(s, 1e-300) / n)
                for s, n in zip(self.signal, self.noise, strict=False)
            ),
            default=float("inf"),
        )

    @property
    def agreement(self) -> float | None:
        return self.agree / self.compared if self.compared else None


def _perturbed(qmodel: nn.Module, relative: float, seed: int) -> list[Any]:
    """Hooks that multiply every quantized layer's input by (1 + relative * noise)."""
    gen = torch.Generator().manual_seed(seed)

    def hook(mod: nn.Module, inputs: tuple[Any, ...]) -> Any:
        x = inputs[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return (x * (1 + relative * noise),) + tuple(inputs[1:])

    return [m.register_forward_pre_hook(hook) for _, m in quant_layers(qmodel)]


def verify_onnx(
    onnx_path: str | os.PathLike[str],
    qmodel: nn.Module,
    inputs: Iterable[Any],
    min_top1_agreement: float = 0.995,
    min_sqnr_db: float = 30.0,
    threads: int = 0,
    floor_margin_db: float = 6.0,
    batch_names: list[str] | None = None,
) -> Verification:
    """Run the ONNX model in ONNX Runtime and the simulation in PyTorch on the same inputs.

    Passes when the deployed outputs agree with the simulated ones to min_sqnr_db (or, for a
    model whose own float-rounding floor is lower, to within floor_margin_db of that floor)
    and, for classifiers, on min_top1_agreement of top-1 predictions (or the floor's agreement,
    if lower). batch_names: what to call each batch in an error (default "inputs[i]").
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        sess, as_uint8_names = exact_session(onnx_path, opts)
    except Exception as err:  # ORT raises its own exception types; nothing was written
        raise ExportError(f"ONNX Runtime cannot load the exported model: {err}") from err
    names = [i.name for i in sess.get_inputs()]
    deployed, floor = Comparison(), Comparison()
    samples = 0
    classify = False
    qmodel.eval()
    for index, batch in enumerate(inputs):
        what = batch_names[index] if batch_names is not None else f"inputs[{index}]"
        sim, sim_noisy = _simulate(qmodel, batch, what, seed=index)
        try:
            raw = sess.run(None, ort_feed(names, batch))
        except Exception as err:  # ORT's own exception types: say which batch it refused
            raise ValueError(
                f"ONNX Runtime cannot run the exported model on {what} ({describe_batch(batch)}): {err}"
            ) from err
        dep = [torch.from_numpy(np.asarray(o)) for o in raw]
        if index == 0:
            classify = sim[0].dim() == 2 and sim[0].shape[1] > 1 and sim[0].is_floating_point()
        deployed.add(sim, dep, classify)
        floor.add(sim, sim_noisy, classify)
        samples += int(sim[0].shape[0]) if sim[0].dim() else 1
    if not deployed.signal:
        raise ValueError("verification needs at least one batch of inputs")
    v = Verification(
        samples=samples,
        top1_agreement=deployed.agreement,
        sqnr_db=deployed.sqnr_db,
        max_abs_err=deployed.max_abs_err,
        floor_top1_agreement=floor.agreement,
        floor_sqnr_db=floor.sqnr_db,
        weights_run_as_uint8=as_uint8_names,
    )
    _conclude(v, min_top1_agreement, min_sqnr_db, floor_margin_db)
    return v


def _simulate(qmodel: nn.Module, batch: Any, what: str, seed: int) -> tuple[list[Tensor], ...]:
    """The simulation's outputs on `batch`, and with its layers' inputs perturbed (the floor)."""
    args, kwargs = split_inputs(batch)
    with torch.no_grad():
        sim = _outputs(run_checked(qmodel, batch, what))
        hooks = _perturbed(qmodel, 1e-7, seed=seed)
        try:
            sim_noisy = _outputs(qmodel(*args, **kwargs))
        finally:
            for h in hooks:
                h.remove()
    return sim, sim_noisy


def _conclude(
    v: Verification, min_top1_agreement: float, min_sqnr_db: float, floor_margin_db: float
) -> None:
    """Set v's required SQNR and agreement (the bars, or the floor's where lower) and verdict."""
    v.required_sqnr_db = min(min_sqnr_db, v.floor_sqnr_db - floor_margin_db)
    problems = []
    if v.sqnr_db < v.required_sqnr_db:
        problems.append(
            f"SQNR {v.sqnr_db:.1f} dB < {v.required_sqnr_db:.1f} dB "
            f"(float-rounding floor of the simulation: {v.floor_sqnr_db:.1f} dB)"
        )
    if v.top1_agreement is not None:
        v.required_top1_agreement = min(min_top1_agreement, v.floor_top1_agreement or 1.0)
        if v.top1_agreement < v.required_top1_agreement:
            problems.append(
                f"top-1 agreement {v.top1_agreement:.4f} < {v.required_top1_agreement:.4f}"
            )
    v.passed = not problems
    v.reason = "; ".join(problems)
