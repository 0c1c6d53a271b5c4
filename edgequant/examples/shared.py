"""Locate the shared folder that holds real data sets and pretrained weights.

The folder is not part of the package (it is large and read-only). It is found, in order:

1. the environment variable ``EDGEQUANT_SHARED``, when it is set (it then decides alone: a
   path set there that does not exist means "absent", never a silent fall-back elsewhere);
2. ``../shared`` next to the repository root (the directory that holds the ``edgequant``
   package directory);
3. ``../shared`` relative to the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "EDGEQUANT_SHARED"


def _candidates() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[2]
    return [repo_root.parent / "shared", Path.cwd().parent / "shared"]


def shared_dir() -> Path | None:
    """The shared folder, or None when it cannot be found."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        path = Path(env).expanduser()
        return path.resolve() if path.is_dir() else None
    for path in _candidates():
        if path.is_dir():
            return path.resolve()
    return None


def require_shared(relpath: str | os.PathLike[str]) -> Path:
    """The path ``relpath`` inside the shared folder; FileNotFoundError if it is missing."""
    base = shared_dir()
    if base is None:
        env = os.environ.get(ENV_VAR, "").strip()
        looked = [Path(env).expanduser()] if env else _candidates()
        raise FileNotFoundError(
            f"shared folder not found (looked in: {', '.join(str(p) for p in looked)}); "
            f"it is needed for {relpath}. Set the environment variable {ENV_VAR} to the folder "
            "that holds data/ and models/."
        )
    path = base / relpath
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist in the shared folder {base} "
            f"(found via {ENV_VAR} or ../shared); {relpath} is needed."
        )
    return path
