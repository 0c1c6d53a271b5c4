"""The decoder pipeline's clipping search (ptq/clip_search.py) against min/max ranges."""

from __future__ import annotations

import torch
from toys import lm_recipe, tiny_llama  # tests/toys.py

import edgequant as eq
from edgequant.ptq import clip_search


def test_clip_search_never_raises_the_output_error_of_min_max() -> None:
    model = tiny_llama()
    q = eq.quantize(model, lm_recipe(3), method="weight_only")
    layer = q.model.layers[0].mlp.down_proj
    x = torch.randn(256, layer.in_features)
    h = x.T @ x
    before = layer.weight_quantizer(layer.weight) - layer.weight
    ratios = clip_search.search_clipping(layer, h)
    after = layer.weight_quantizer(layer.weight) - layer.weight
    cost = lambda e: float(((e.detach().double() @ h.double()) * e.detach().double()).sum())  # noqa: E731
    assert cost(after) <= cost(before) + 1e-9
    assert ratios.shape == layer.weight_quantizer.scale.shape and float(ratios.min()) < 1.0
