"""Names for the nodes and values that graph rewrites add to an ONNX graph."""

from __future__ import annotations


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, else `base_1`, `base_2`...: the first name not in `taken`, which then holds it."""
    name, index = base, 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name
