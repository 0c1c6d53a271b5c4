"""One writer for the benchmarks' results files: atomic (a temp file beside it, then a rename),
so a run cut off mid-write leaves the previous file whole, never half of a JSON document."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from edgequant._io import atomic_write_text


def write_json(path: str | os.PathLike[str], data: Any, **dumps: Any) -> None:
    """json.dumps(data, indent=1, **dumps) to `path`, its folder created, atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, **{"indent": 1, **dumps}))


def cifar_missing() -> bool:
    """True, after saying so on stderr, where ../shared (CIFAR-10, ResNet-20 weights) is absent:
    the caller skips (exit 0) rather than fail on a fresh clone."""
    from edgequant.examples.shared import shared_dir

    if shared_dir() is not None:
        return False
    print(
        "skipped: ../shared (CIFAR-10, ResNet-20 weights) is absent; set EDGEQUANT_SHARED",
        file=sys.stderr,
    )
    return True
