"""ONNX export (import name ``diffgap.export``): encoders and fused fixed-step samplers, FP32 + FP16.

Modules: :mod:`.onnx_export` (generic IOSpec-driven export), :mod:`.fused` (the K-step sampler
module), :mod:`.fp16` (ModelOpt AutoCast mixed precision), :mod:`.lint` (TensorRT compatibility),
:mod:`.check` (PyTorch parity), :mod:`.cli` (``diffgap export`` and :func:`export_all`).
Importing this package is light (no torch/onnx until a function runs).
"""
from .cli import ExportCheckError, ExportResult, export_all

__all__ = ["ExportCheckError", "ExportResult", "export_all"]
