"""One writer for the benchmarks' results files: atomic (a temp file beside it, then a rename),
so a run cut off mid-write leaves the previous file whole, never half of a JSON document."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgequant._io import atomic_write_text


def write_json(path: str | os.PathLike[str], data: Any, **dumps: Any) -> None:
    """json.dumps(data, indent=1, **dumps) to `path`, its folder created, atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, **{"indent": 1, **dumps}))
