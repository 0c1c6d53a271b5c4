"""edgequant: quantize a PyTorch model, export it as an integer ONNX model, prove it in ONNX Runtime."""

from edgequant.ptq import quantize
from edgequant.spec import LayerOverride, QuantSpec, Recipe

__all__ = ["LayerOverride", "QuantSpec", "Recipe", "quantize"]
__version__ = "0.1.0"
