"""ONNX export of the models of ``EXPORTABLE`` (``python -m dab_detr.export``): the module
traced (``wrapper``), the export with dynamic batch and image sizes (``exporter``) and the check
against onnxruntime (``check``). onnx, onnxscript and onnxruntime are imported only when used."""

from .check import CheckReport, check_onnx, match_detections, pytorch_detections, run_onnxruntime
from .exporter import INPUT_NAMES, OPSET, OUTPUT_NAMES, check_exportable, export_onnx, require
from .wrapper import EXPORTABLE, ExportableDetector, ExportError

__all__ = [
    "EXPORTABLE",
    "INPUT_NAMES",
    "OPSET",
    "OUTPUT_NAMES",
    "CheckReport",
    "ExportError",
    "ExportableDetector",
    "check_exportable",
    "check_onnx",
    "export_onnx",
    "match_detections",
    "pytorch_detections",
    "require",
    "run_onnxruntime",
]
