"""QAT checkpoints: written atomically after every epoch, refused when they come from another
recipe or model (DESIGN §3, invariant 4: an interrupted run resumes to the same result)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgequant._io import atomic_path

FORMAT = 1
FILENAME = "qat_last.pt"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: the recipe the model was prepared with and the shape of
    every tensor in its state dict."""
    info = getattr(model, "quant_info", None)
    recipe = info.get("recipe") if isinstance(info, dict) else None
    shapes = {
        key: list(value.shape)
        for key, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
    }
    return {"recipe": recipe, "tensors": shapes}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    out: list[str] = []
    rs, rc = saved.get("recipe") or {}, current.get("recipe") or {}
    for key in sorted(set(rs) | set(rc)):
        if rs.get(key) != rc.get(key):
            out.append(
                f"recipe field {key!r}: checkpoint {rs.get(key)!r}, this model {rc.get(key)!r}"
            )
    ts, tc = saved.get("tensors", {}), current.get("tensors", {})
    missing = sorted(set(ts) - set(tc))
    extra = sorted(set(tc) - set(ts))
    if missing:
        out.append(
            f"tensors only in the checkpoint: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    if extra:
        out.append(
            f"tensors only in this model: {', '.join(extra[:5])}"
            + (" ..." if len(extra) > 5 else "")
        )
    for key in sorted(set(ts) & set(tc)):
        if ts[key] != tc[key]:
            out.append(f"tensor {key!r}: shape {ts[key]} in the checkpoint, {tc[key]} here")
    return out


def rng_state() -> dict[str, Any]:
    """Every random generator a training loop may draw from (torch, Python, NumPy)."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            *map(float, np_state[2:]),
        ],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    )


def checkpoint_file(checkpoint_dir: Any) -> tuple[Path | None, bool]:
    """(the checkpoint file or None, whether its folder existed before), the folder made."""
    if checkpoint_dir is None:
        return None, False
    path = Path(checkpoint_dir) / FILENAME
    for folder in (path.parent, *path.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(
                f"checkpoint_dir={str(checkpoint_dir)!r}: {str(folder)!r} is a file, not a "
                f"folder; {FILENAME} is written inside checkpoint_dir"
            )
    was_there = path.parent.is_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, was_there


def save(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """torch.save to a temp file beside `path`, then a rename."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load(path: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
    """A checkpoint written by save(), checked against `model`'s fingerprint."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise ValueError(f"cannot read the QAT checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an edgequant QAT checkpoint (format {FORMAT})")
    diff = differences(state["fingerprint"], fingerprint(model))
    if diff:
        raise ValueError(
            f"the checkpoint {path} was made with a different recipe or model; refusing to "
            "resume from it:\n  " + "\n  ".join(diff)
        )
    return state
