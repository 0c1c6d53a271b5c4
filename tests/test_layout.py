"""The tests mirror the package: edgequant/<package>/<module>.py is tested in
tests/<package>/test_<module>.py (a top-level module in tests/test_<module>.py), so a newcomer
finds a module's tests by its name.

A module whose tests live elsewhere is listed in COVERED_ELSEWHERE with the test file that covers
it and why that file is the better home. The test fails on a module with neither (a new module
without tests), on an entry whose module has gone or has gained its mirror (so the list only
shrinks), and on an entry whose test file does not exist or never names the module or anything
it defines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "edgequant"

# Not modules with behaviour of their own: package markers and the `python -m` entry point.
NOT_MODULES = {"__init__.py", "__main__.py"}

# module (relative to edgequant/) -> (the test file that covers it, relative to tests/; why there)
COVERED_ELSEWHERE: dict[str, tuple[str, str]] = {
    # Export internals, tested through the TFLite exporter that calls them.
    "export/pt2e.py": (
        "export/test_tflite.py",
        "the PT2E program is what the TFLite path converts",
    ),
    "export/tflite_runtime.py": ("export/test_tflite.py", "the TFLite side of export_tflite"),
}


def modules() -> list[str]:
    """Every module of the package, as a path relative to edgequant/."""
    return sorted(
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name not in NOT_MODULES and "__pycache__" not in p.parts
    )


def mirror(module: str) -> Path:
    """tests/<package>/test_<module>.py for edgequant/<package>/<module>.py."""
    path = Path(module)
    return TESTS / path.parent / f"test_{path.name}"


def defined_names(module: str) -> set[str]:
    """The top-level functions, classes and constants a module defines."""
    tree = ast.parse((PACKAGE / module).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if len(n.lstrip("_")) > 3}


def test_the_package_has_modules() -> None:
    assert len(modules()) > 50 and "functional.py" in modules()


@pytest.mark.parametrize("module", modules())
def test_every_module_has_its_mirrored_test_module_or_says_where_it_is_tested(
    module: str,
) -> None:
    if mirror(module).is_file():
        assert module not in COVERED_ELSEWHERE, (
            f"edgequant/{module} now has {mirror(module).relative_to(TESTS.parent)}: "
            "remove it from COVERED_ELSEWHERE"
        )
        return
    assert module in COVERED_ELSEWHERE, (
        f"edgequant/{module} has no tests/{mirror(module).relative_to(TESTS)}: write it, or list "
        "the module in COVERED_ELSEWHERE with the test file that covers it and why"
    )


@pytest.mark.parametrize("module", sorted(COVERED_ELSEWHERE))
def test_each_listed_module_exists_and_its_test_file_names_it(module: str) -> None:
    assert (PACKAGE / module).is_file(), f"edgequant/{module} is gone: remove its entry"
    test_file, reason = COVERED_ELSEWHERE[module]
    assert reason, f"edgequant/{module}: say why it is tested in {test_file}"
    path = TESTS / test_file
    assert path.is_file(), f"edgequant/{module} is said to be covered by {test_file}: no such file"
    text = path.read_text()
    dotted = "edgequant." + module.removesuffix(".py").replace("/", ".")
    words = set(re.findall(r"\w+", text))
    named = dotted in text or module in text or bool(defined_names(module) & words)
    assert named, f"tests/{test_file} names neither edgequant/{module} nor anything it defines"


# Each algorithm the README names -> the file named after it. The file's docstring opens with
# the algorithm's name (and its paper, where it has one), so grep and a newcomer both land there.
README = TESTS.parent / "README.md"
ALGORITHMS: dict[str, str] = {
    "SmoothQuant": "ptq/smoothquant.py",
    "GPTQ": "ptq/gptq.py",
    "AdaRound": "ptq/adaround.py",
    "block reconstruction": "ptq/brecq.py",
    "bias correction": "ptq/bias_correction.py",
    "cross-layer equalization": "ptq/equalize.py",
    "outlier channel splitting": "ptq/outlier_split.py",
    "AWQ": "ptq/awq.py",
    "clipping search": "ptq/clip_search.py",
    '"auto" calibrator': "ptq/auto.py",
    "LSQ": "qat/lsq.py",
    "PACT": "qat/pact.py",
    "EMA": "qat/ema.py",
    "Hessian trace": "mixed/hawq.py",
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_algorithm_the_readme_names_opens_the_file_named_after_it(name: str) -> None:
    assert name.lower() in README.read_text().lower(), f"the README no longer names {name}"
    path = PACKAGE / ALGORITHMS[name]
    assert path.is_file(), f"{name}: no edgequant/{ALGORITHMS[name]}"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    opening = doc.split("\n\n")[0]
    assert name.lower() in opening.lower(), (
        f"edgequant/{ALGORITHMS[name]} does not open with {name}"
    )
