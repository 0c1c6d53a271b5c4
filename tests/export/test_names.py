from __future__ import annotations

from edgequant.export.names import fresh_name


def test_fresh_name_takes_the_first_free_suffix_and_holds_it() -> None:
    taken = {"x", "x_1"}
    assert fresh_name("y", taken) == "y"
    assert fresh_name("x", taken) == "x_2"
    assert fresh_name("x", taken) == "x_3"
    assert taken == {"x", "x_1", "x_2", "x_3", "y"}
