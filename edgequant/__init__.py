"""edgequant: quantize a PyTorch model, export it as an integer ONNX model, prove it in ONNX Runtime."""

from edgequant.check import check
from edgequant.export.executorch import export_executorch
from edgequant.export.integer import run_integer
from edgequant.export.onnx import ExportError, ExportInfo, export_onnx
from edgequant.export.tflite import EdgeExportInfo, export_tflite
from edgequant.mixed import Budget, mixed_precision
from edgequant.ptq import load, quantize
from edgequant.qat import FitConfig, fit_qat, prepare_qat
from edgequant.recipe import Recipe
from edgequant.report.compare import Report, compare
from edgequant.spec import LayerOverride, QuantSpec

__all__ = [
    "Budget",
    "EdgeExportInfo",
    "ExportError",
    "ExportInfo",
    "FitConfig",
    "LayerOverride",
    "QuantSpec",
    "Recipe",
    "Report",
    "check",
    "compare",
    "export_executorch",
    "export_onnx",
    "export_tflite",
    "fit_qat",
    "load",
    "mixed_precision",
    "prepare_qat",
    "quantize",
    "run_integer",
]
__version__ = "0.1.0"
