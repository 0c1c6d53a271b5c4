"""The layer contract of DESIGN §2, checked on the source: a module imports only from its own
layer or lower ones, never a private name (a leading underscore) of another package or
module, and never the top-level package (whose __init__ re-exports everything).

Known breaches are listed in KNOWN with the reason each is still there; the test fails on any
breach not listed, and on a listed one that is gone (so the list shrinks as they are fixed).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgequant"

# Lowest first; a name is a top-level module or subpackage of edgequant.
LAYERS: list[set[str]] = [
    {"_yaml", "_io", "batches", "summary", "slow_paths"},
    {"spec"},
    {"targets"},
    {"recipe"},
    {"functional", "metrics"},
    {"observers", "quantizer"},
    {"modules"},
    {"instrument", "graph_quantizers", "check", "attention", "ort_kernels"},
    {"ptq", "qat", "mixed"},
    {"export"},
    {"bench"},
    {"examples"},
    {"report", "config"},
    {"cli", "__init__", "__main__"},
]

# (importing module, what it breaches) -> why it is still there. Empty: add a breach here only
# with its reason.
KNOWN: dict[tuple[str, str], str] = {}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def breaches(package: Path = PACKAGE) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        own = _layer(module)
        if path == package / "__init__.py" or _top(module) in ("cli", "__main__"):
            continue  # the API and the command line sit above everything
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "edgequant":
                    # `from edgequant import functional`: a submodule, not the package's API.
                    for alias in node.names:
                        if (package / f"{alias.name}.py").is_file() or (
                            package / alias.name
                        ).is_dir():
                            targets.append((f"edgequant.{alias.name}", []))
                        else:
                            found.add((module, "top-level package"))
                elif node.module.startswith("edgequant."):
                    targets.append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "edgequant":
                        found.add((module, "top-level package"))
                    elif alias.name.startswith("edgequant."):
                        targets.append((alias.name, []))
            for target, names in targets:
                theirs = _layer(target)
                if own is not None and theirs is not None and theirs > own:
                    found.add((module, f"up: {_top(target)}"))
                if _top(target) != _top(module):
                    for name in names:
                        if name.startswith("_"):
                            found.add((module, f"private: {target}.{name}"))
    return found


def test_every_module_has_a_layer() -> None:
    missing = sorted(
        _module_name(p)
        for p in PACKAGE.rglob("*.py")
        if p != PACKAGE / "__init__.py" and _layer(_module_name(p)) is None
    )
    assert not missing, f"modules in no layer of LAYERS: {missing}"


def test_imports_keep_to_the_layers() -> None:
    found = breaches()
    new = sorted(found - set(KNOWN))
    assert not new, "imports that break the layer contract (DESIGN §2): " + "; ".join(
        f"{m} -> {what}" for m, what in new
    )
    gone = sorted(set(KNOWN) - found)
    assert not gone, f"fixed, so remove from KNOWN: {gone}"


@pytest.mark.parametrize("source", ["from edgequant.export.onnx import _x", "import edgequant"])
def test_the_check_sees_a_breach(tmp_path: Path, source: str) -> None:
    """A private import across packages and the top-level import are both caught."""
    package = tmp_path / "edgequant"
    (package / "ptq").mkdir(parents=True)
    (package / "ptq" / "probe.py").write_text(source + "\n")
    assert {m for m, _ in breaches(package)} == {"edgequant.ptq.probe"}


def test_import_linter_keeps_the_layer_contract() -> None:
    """The same contract, stated for a standard tool in pyproject.toml ([tool.importlinter])."""
    from importlinter.cli import lint_imports

    config = PACKAGE.parent / "pyproject.toml"
    assert lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 0


def test_no_import_cycle() -> None:
    """No module reaches itself through imports (function-local imports included)."""
    import grimp

    graph = grimp.build_graph("edgequant", include_external_packages=False)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append(" -> ".join((module, *back)))
    assert not cycles, "import cycles: " + "; ".join(cycles[:5])


# docs/imports.dot is drawn by pydeps (docs/DESIGN.md §2 gives the command). pydeps draws no
# edge for an import of the top-level package itself (the CLI's `import edgequant as eq`).
DRAWN_GRAPH = PACKAGE.parent / "docs" / "imports.dot"
REDRAW = (
    "pydeps edgequant --only edgequant --max-module-depth 2 --rankdir BT --no-output "
    "--dot-output docs/imports.dot"
)


def drawn_edges(dot: str) -> set[tuple[str, str]]:
    """(imported, importer) node pairs of a pydeps graph: `a -> b` is drawn where b imports a."""
    return {(a, b) for a, b in re.findall(r"^\s*(\w+) -> (\w+)", dot, re.MULTILINE)}


def package_edges() -> set[tuple[str, str]]:
    """The same pairs from the source, as grimp reads it, modules cut to edgequant.<name>."""
    import grimp

    graph = grimp.build_graph("edgequant", include_external_packages=False)

    def node(module: str) -> str:
        return "_".join(module.split(".")[:2])

    return {
        (node(imported), node(module))
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if node(imported) != node(module) and imported != "edgequant"
    }


def test_the_drawn_import_graph_is_current() -> None:
    drawn, actual = drawn_edges(DRAWN_GRAPH.read_text()), package_edges()
    assert len(drawn) > 50, "docs/imports.dot holds no pydeps graph"
    assert drawn == actual, (
        f"docs/imports.dot is out of date; redraw it from the repository root with `{REDRAW}` "
        f"(imports not drawn: {sorted(actual - drawn)}; drawn but gone: {sorted(drawn - actual)})"
    )
