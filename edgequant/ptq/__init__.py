"""Post-training quantization: static, dynamic and weight-only."""

from edgequant.ptq.quantize import METHODS, quantize

__all__ = ["METHODS", "quantize"]
