"""One job per file, one step per function, checked on the source: no module of edgequant/ over
MAX_FILE_LINES lines and no function over MAX_FUNCTION_LINES lines.

Known exceptions are listed with the reason each is still there; the test fails on any new one,
and on a listed one that is gone (so the lists shrink as they are fixed).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgequant"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

# Known exceptions, each with its reason (none at present).
KNOWN_FILES: dict[str, str] = {}
KNOWN_FUNCTIONS: dict[tuple[str, str], str] = {}


def long_files(package: Path = PACKAGE, limit: int = MAX_FILE_LINES) -> set[str]:
    return {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if len(path.read_text().splitlines()) > limit
    }


def long_functions(
    package: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES
) -> set[tuple[str, str]]:
    """(file, function name) of every function whose def line to last line spans over limit."""
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                if node.end_lineno - node.lineno + 1 > limit:
                    found.add((path.relative_to(package).as_posix(), node.name))
    return found


def _check(seen: set, known: dict, what: str) -> None:
    new = sorted(seen - set(known))
    assert not new, f"{what}: {new}; split them into named steps or modules"
    gone = sorted(set(known) - seen)
    assert not gone, f"no longer {what}, so remove from the known list: {gone}"


def test_no_file_over_the_limit() -> None:
    _check(long_files(), KNOWN_FILES, f"files over {MAX_FILE_LINES} lines")


def test_no_function_over_the_limit() -> None:
    _check(long_functions(), KNOWN_FUNCTIONS, f"functions over {MAX_FUNCTION_LINES} lines")


def test_the_check_sees_a_long_file_and_function(tmp_path: Path) -> None:
    """A file over the limit and a function over the limit are both found, by path and name."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "mod.py").write_text(f"def long_one():\n{body}\n\n\ndef short_one():\n    pass\n")
    assert long_functions(tmp_path) == {("mod.py", "long_one")}
    assert long_files(tmp_path, limit=MAX_FUNCTION_LINES) == {"mod.py"}
    assert long_files(tmp_path) == set()
