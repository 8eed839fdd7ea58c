"""ONNX export (import name ``diffgap.export``): encoders and fused fixed-step samplers, FP32 + FP16."""
