"""ptq/calibrate.py, as eq.quantize reads calibration data: empty data and a single tensor are
refused by name; exactly num_samples samples are read (the cap, and a note when the data holds
more); calibration is deterministic, from a list or a one-shot generator."""

from __future__ import annotations

import pytest
import torch
from toys import bitwise_equal, quantize_case, run_item  # tests/toys.py

import edgequant as eq
from edgequant.quantizer import quantizers


@pytest.mark.parametrize("method", ["static", "dynamic", "weight_only"])
def test_empty_calibration_data_raises(method: str) -> None:
    model, _, _ = quantize_case("mlp")
    with pytest.raises(ValueError, match="empty"):
        eq.quantize(model, "w8a8", [], method=method)
    with pytest.raises(ValueError, match="empty"):
        eq.quantize(model, "w8a8", iter(()), method=method)
    if method == "static":  # dynamic and weight-only need none (tests/ptq/test_auto.py)
        with pytest.raises(ValueError, match="calib_data"):
            eq.quantize(model, "w8a8", None, method=method)


def test_single_tensor_instead_of_an_iterable_is_a_type_error() -> None:
    model, calib, _ = quantize_case("mlp")
    with pytest.raises(TypeError, match=r"wrap it in a list"):
        eq.quantize(model, "w8a8", calib[0])


# --- sample counts and determinism --------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [1, 3, 4, 6, 13, 16])
def test_num_samples_is_respected_exactly(num_samples: int) -> None:
    model, calib, _ = quantize_case("mlp")
    # Plant an outlier right after the last sample that may be read: it must not move any range.
    data = torch.cat(calib)
    if num_samples < len(data):
        data[num_samples] = 1e3
    batches = list(data.split(4))
    qmodel = eq.quantize(model, "w8a8", batches, num_samples=num_samples)
    assert qmodel.quant_info["samples_used"] == num_samples
    reference = eq.quantize(model, "w8a8", [data[:num_samples]])
    for q, r in zip(quantizers(qmodel), quantizers(reference), strict=True):
        assert bitwise_equal(q.scale, r.scale), q.name
        assert torch.equal(q.zero_point, r.zero_point), q.name


def test_num_samples_beyond_the_data_uses_all_of_it() -> None:
    model, calib, _ = quantize_case("mlp")
    everything = eq.quantize(model, "w8a8", calib, num_samples=1000)
    assert everything.quant_info["samples_used"] == 16
    assert not any("holds more" in n for n in everything.quant_summary.notes)
    recipe = eq.Recipe.preset("w8a8").replace(calib_samples=5)
    assert eq.quantize(model, recipe, calib).quant_info["samples_used"] == 5


@pytest.mark.parametrize("cap", [4, 5])  # at a batch boundary (4 of 4 + 4 + ...) and inside one
def test_data_beyond_the_cap_is_named_in_the_summary(cap: int) -> None:
    """A user who passes more calibration samples than the cap is told the rest went unused."""
    model, calib, _ = quantize_case("mlp")
    batches = list(torch.cat(calib).split(4))
    recipe = eq.Recipe.preset("w8a8").replace(calib_samples=cap)
    for method in ("static", "weight_only"):
        qmodel = eq.quantize(model, recipe.replace(rounding="gptq"), batches, method=method)
        notes = [n for n in qmodel.quant_summary.notes if "holds more" in n]
        assert notes and f"first {cap} samples" in notes[0], (method, qmodel.quant_summary.notes)
    qat = eq.prepare_qat(model, recipe, batches)
    assert any(f"first {cap} samples" in n for n in qat.quant_summary.notes)
    exact = eq.quantize(model, recipe, batches[:1] if cap == 4 else [torch.cat(calib)[:5]])
    assert not any("holds more" in n for n in exact.quant_summary.notes)


@pytest.mark.parametrize("name", ["cnn", "residual"])
def test_calibration_is_deterministic(name: str) -> None:
    model, calib, test = quantize_case(name)
    first = eq.quantize(model, "w8a8", calib)
    second = eq.quantize(model, "w8a8", (x.clone() for x in calib))  # a one-shot generator
    pairs = list(zip(quantizers(first), quantizers(second), strict=True))
    assert pairs
    for a, b in pairs:
        assert a.name == b.name and bitwise_equal(a.scale, b.scale)
        assert torch.equal(a.zero_point, b.zero_point)
    assert bitwise_equal(run_item(first, test), run_item(second, test))
