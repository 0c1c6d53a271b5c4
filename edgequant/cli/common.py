"""What every subcommand of the `edgequant` command shares: the user error, the command record,
--out checks and the printing helpers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Exit status for a user error (missing file, not an ONNX model, bad argument): argparse's too.
USAGE_ERROR = 2


class UserError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def check_out_folder(out: str) -> None:
    """--out names a folder to create or fill: refused before any work when it, or a folder it
    would be created in, is a file (the report's mkdir came after minutes of quantizing)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out: {out!r} exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out: {out!r} cannot be created: {str(parent)!r} is a file")
            break


def print_error(message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"edgequant: error: {first_line}", file=sys.stderr)


def megabytes(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.3f} MB" if size_bytes >= 100_000 else f"{size_bytes / 1e3:.1f} kB"


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
