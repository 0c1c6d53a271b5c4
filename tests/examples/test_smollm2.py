"""The real SmolLM2-135M (examples/smollm2.py) at int4 g64: perplexity close to the float model
(slow; skipped without ../shared)."""

from __future__ import annotations

import math

import pytest
from toys import lm_recipe  # tests/toys.py

import edgequant as eq
from edgequant.metrics import perplexity


@pytest.mark.slow
def test_smollm2_int4_g64_perplexity_close_to_the_reference() -> None:
    from edgequant.examples.shared import shared_dir

    if shared_dir() is None:
        pytest.skip("../shared (SmolLM2-135M, WikiText-2) is absent; set EDGEQUANT_SHARED")
    pytest.importorskip("gguf")
    from edgequant.examples.smollm2 import (
        TEST_TEXT,
        calibration_batches,
        load_smollm2,
        text_windows,
    )

    model, tokenizer = load_smollm2()
    test = text_windows(tokenizer, TEST_TEXT, 512, 4)
    q = eq.quantize(
        model,
        lm_recipe(4, 64),
        calib_data=calibration_batches(tokenizer, 512, 16, 4),
        method="weight_only",
    )
    reference, quantized = perplexity(model, test), perplexity(q, test)
    assert math.isfinite(quantized) and quantized <= 1.06 * reference
