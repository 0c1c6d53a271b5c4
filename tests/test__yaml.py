"""_yaml.py: YAML reading that refuses a key given twice in one mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import edgequant as eq
from edgequant._yaml import DuplicateKeyError, safe_load


def test_a_recipe_with_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    # Before: the recipe below quantized its weights at 8 bits, the second value.
    text = "name: twice\nweight:\n  bits: 4\n  symmetric: true\n  bits: 8\n"
    with pytest.raises(ValueError, match=r"duplicate key 'bits' \(first on line 3\)"):
        eq.Recipe.from_yaml(text)
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"twice.yaml is not valid YAML: duplicate key 'bits'"):
        eq.Recipe.from_yaml(path)


def test_safe_load_names_the_key_given_twice_and_both_lines() -> None:
    assert safe_load("a: 1\nb:\n  c: 2\n") == {"a": 1, "b": {"c": 2}}
    with pytest.raises(DuplicateKeyError) as info:
        safe_load("a: 1\nb:\n  c: 2\n  c: 3\n")
    assert (info.value.key, info.value.line, info.value.first_line) == ("c", 4, 3)
    assert isinstance(info.value, yaml.YAMLError)
    # `<<` merge keys follow PyYAML's own rules: the merged key is overridden, not duplicated.
    assert safe_load("base: &b {x: 1}\nd:\n  <<: *b\n  x: 2\n")["d"] == {"x": 2}
