"""Torch-free runtime (import name ``diffgap.runtime``): onnxruntime and TensorRT sessions behind one
interface, the engine builder, and the Pipeline API. Imports only numpy, onnxruntime / tensorrt+pycuda,
and the torch-free contract modules ``diffgap.iospec``, ``diffgap.manifest``, ``diffgap.fsutil``.
"""
