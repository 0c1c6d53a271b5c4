"""A torch.fx tracer that follows tensors made from a shape: `torch.zeros(x.shape[0], 8, h, w)`
and its kin. fx records `torch.zeros_like(x)` and `x.new_zeros(...)` by itself, but calls
`torch.zeros` with the proxies of `x.shape[i]`, which torch's argument parser rejects, so such a
model could not be traced at all."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx

# Tensor factories whose arguments are a shape (and a fill value, dtype, device).
SHAPE_FACTORIES = ("zeros", "ones", "full", "empty")


def _proxy_in(value: Any) -> torch.fx.Proxy | None:
    found: list[torch.fx.Proxy] = []

    def visit(v: Any) -> Any:
        if isinstance(v, torch.fx.Proxy):
            found.append(v)
        return v

    torch.fx.node.map_aggregate(value, visit)
    return found[0] if found else None


def _recording(factory: Callable[..., Any]) -> Callable[..., Any]:
    """factory, recorded as one call in the graph when a size or option is a proxy."""

    def call(*args: Any, **kwargs: Any) -> Any:
        proxy = _proxy_in((args, kwargs))
        if proxy is None:
            return factory(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", factory, args, kwargs)

    return call


@contextlib.contextmanager
def recording_shape_factories() -> Iterator[None]:
    """Within: torch's shape factories accept fx proxies (restored on exit, even on error)."""
    originals = {name: getattr(torch, name) for name in SHAPE_FACTORIES}
    try:
        for name, factory in originals.items():
            setattr(torch, name, _recording(factory))
        yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)


class ShapeTracer(torch.fx.Tracer):
    """torch.fx.Tracer that also records shape factories called with traced sizes."""

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> torch.fx.Graph:
        with recording_shape_factories():
            return super().trace(root, concrete_args)


def shape_trace(model: torch.nn.Module) -> torch.fx.GraphModule:
    """torch.fx.symbolic_trace with ShapeTracer."""
    graph = ShapeTracer().trace(model)
    name = type(model).__name__
    return torch.fx.GraphModule(model, graph, class_name=name)
