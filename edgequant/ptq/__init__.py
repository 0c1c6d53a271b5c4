"""Post-training quantization: static, dynamic and weight-only."""

from edgequant.ptq.quantize import METHODS, load, quantize

__all__ = ["METHODS", "load", "quantize"]
