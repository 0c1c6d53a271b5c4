"""YAML reading that refuses a key given twice in one mapping. PyYAML's safe_load keeps the last
value silently, so a recipe or config with `bits: 4` and, further down, `bits: 8` would run at 8
bits without a word."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError


class DuplicateKeyError(ConstructorError):
    """A mapping of a YAML document gives `key` twice: first on line `first_line`, again on
    `line` (1-based)."""

    def __init__(self, key: str, line: int, first_line: int, mark: Any) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (first on line {first_line})", mark)
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if (
                not isinstance(key_node, yaml.ScalarNode)
                or key_node.tag == "tag:yaml.org,2002:merge"
            ):
                continue  # `<<` merge keys and complex keys: PyYAML's own rules apply
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(str(key), line, seen[key], key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """yaml.safe_load, except that a key given twice in one mapping raises DuplicateKeyError (a
    yaml.YAMLError) naming the key and both lines."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
