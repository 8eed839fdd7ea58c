"""onnxruntime's TensorRT execution provider, set up for diffgap's exported graphs.

One source for the provider options that ``open_model(..., backend="ort-trt")`` passes to
onnxruntime and that the Triton repository's ``onnxruntime_onnx`` models give Triton's TensorRT
accelerator, so the two run the same network the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from diffgap.core.iospec import IOSpec


def ort_trt_profile_shapes(io: IOSpec) -> dict[str, str]:
    """The IOSpec's min/opt/max input shapes as ORT TensorRT provider options
    (``trt_profile_{min,opt,max}_shapes``, ``"name:1x512,other:1x1"``): one explicit profile, so the
    provider builds one engine for the declared batch range instead of rebuilding as batches grow."""
    cols: list[list[str]] = [[], [], []]
    for t in io.inputs:
        for col, shape in zip(cols, io.profile(t.name)):
            col.append(f"{t.name}:{'x'.join(str(int(d)) for d in shape)}")
    return {f"trt_profile_{k}_shapes": ",".join(c) for k, c in zip(("min", "opt", "max"), cols)}


def ort_trt_options(io: IOSpec, cache_dir: str | Path) -> dict[str, Any]:
    """onnxruntime TensorRT provider options for an exported graph.

    FP16/INT8 stay off: the exported FP16 graph already carries its types (AutoCast kept some nodes
    in FP32), and only with those options off does the provider build a strongly typed network that
    keeps them; with ``trt_fp16_enable`` it builds a weakly typed one free to lower any node to FP16.
    The profile is the IOSpec's, and engines + timing cache persist in ``cache_dir``.
    """
    cache = str(cache_dir)
    return {
        "trt_fp16_enable": False,
        "trt_int8_enable": False,
        **ort_trt_profile_shapes(io),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
    }
