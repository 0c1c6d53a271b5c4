"""config/schema.py: the parts of a Config; a factory is named as package.module:function."""

from __future__ import annotations

import pytest

from edgequant.config import Factory


def test_factory_parse() -> None:
    factory = Factory.parse("a.b:c.d", {"k": 1})
    assert (factory.module, factory.function, factory.kwargs) == ("a.b", "c.d", (("k", 1),))
    for bad in ["a.b", "a:b:c", ":b", "a:", "a b:c", 3]:
        with pytest.raises(ValueError, match="package.module:function"):
            Factory.parse(bad)  # type: ignore[arg-type]
