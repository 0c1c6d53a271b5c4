"""spec.py: bad specs fail at the boundary naming the valid choices; a QuantSpec's grid limits,
and LayerOverride's field checks."""

from __future__ import annotations

import pytest

from edgequant.spec import LayerOverride, QuantSpec

# --- QuantSpec validation -----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_quantspec_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match=r"2\.\.16"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 8, 16])
def test_quantspec_grid_limits(bits: int) -> None:
    signed = QuantSpec(bits=bits)
    assert (signed.qmin, signed.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    narrow = QuantSpec(bits=bits, narrow_range=True)
    assert (narrow.qmin, narrow.qmax) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    unsigned = QuantSpec(bits=bits, signed=False, symmetric=False)
    assert (unsigned.qmin, unsigned.qmax) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [8.0, "8", True])
def test_quantspec_bits_must_be_int(bits: object) -> None:
    with pytest.raises(TypeError, match="int"):
        QuantSpec(bits=bits)  # type: ignore[arg-type]


def test_bad_granularity_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        QuantSpec(granularity="row")
    message = str(info.value)
    assert "'row'" in message
    for valid in ("tensor", "channel", "group"):
        assert valid in message


@pytest.mark.parametrize("group_size", [None, 0, -4])
def test_group_needs_a_positive_size(group_size: int | None) -> None:
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="group", axis=1, group_size=group_size)


def test_group_size_without_group_granularity() -> None:
    with pytest.raises(ValueError, match="group"):
        QuantSpec(granularity="channel", group_size=32)


def test_narrow_range_unsigned_is_rejected() -> None:
    with pytest.raises(ValueError) as info:
        QuantSpec(signed=False, symmetric=False, narrow_range=True)
    assert "signed" in str(info.value)


def test_unknown_scale_type_and_observer_name_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        QuantSpec(scale_type="log2")
    assert "float" in str(info.value) and "pow2" in str(info.value)
    with pytest.raises(ValueError) as info:
        QuantSpec(observer="median")
    assert "minmax" in str(info.value) and "percentile" in str(info.value)


def test_quantspec_is_frozen() -> None:
    spec = QuantSpec()
    with pytest.raises(AttributeError):
        spec.bits = 4  # type: ignore[misc]
    assert spec.replace(bits=4).bits == 4 and spec.bits == 8


def test_quantspec_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="bitz"):
        QuantSpec.from_dict({"bitz": 8})
    spec = QuantSpec(bits=4, granularity="group", axis=1, group_size=32, observer="mse")
    assert QuantSpec.from_dict(spec.to_dict()) == spec


# --- values of the wrong type (hand-written YAML) -------------------------------------------------


@pytest.mark.parametrize("field", ["signed", "symmetric", "narrow_range"])
def test_quantspec_flags_must_be_booleans(field: str) -> None:
    # A quoted YAML 'false' is a non-empty string: truthy, so it used to mean true.
    with pytest.raises(TypeError, match=rf"QuantSpec\.{field} must be true or false, got 'false'"):
        QuantSpec(**{field: "false"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"granularity": "channel", "axis": "0"}, r"QuantSpec\.axis must be an int.*'0'"),
        ({"granularity": "group", "axis": 1, "group_size": "32"}, r"group_size.*got '32'"),
        ({"granularity": "group", "axis": 1, "group_size": True}, r"group_size.*got True"),
    ],
)
def test_quantspec_axis_and_group_size_must_be_ints(changes: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        QuantSpec(**changes)


def test_quantspec_observer_of_the_wrong_type_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"observer=\['minmax'\] is unknown; valid: minmax"):
        QuantSpec(observer=["minmax"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": None}, r"pattern must be a non-empty.*got None"),
        ({"pattern": ""}, r"pattern must be a non-empty.*got ''"),
        ({"pattern": "fc", "weight": {"bits": 4}}, r"LayerOverride\('fc'\)\.weight.*got dict"),
        ({"pattern": "fc", "skip": "no"}, r"LayerOverride\('fc'\)\.skip.*got 'no'"),
    ],
)
def test_layer_override_checks_its_fields(kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        LayerOverride(**kwargs)
