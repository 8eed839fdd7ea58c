"""onnxruntime's TensorRT execution provider, set up for diffgap's exported graphs.

One declaration of the provider options: ``open_model(..., backend="ort-trt")`` passes
:func:`ort_trt_options` to onnxruntime, and the Triton repository's ``onnxruntime_onnx`` models give
Triton's TensorRT accelerator the same options through :func:`triton_accelerator_parameters` (the
onnxruntime backend's parameter names), so the two run the same network the same way. Every option
not named here keeps onnxruntime's default in both places: Triton's onnxruntime backend starts from
onnxruntime's default TensorRT options and sets only the parameters a model config names.

Typing. FP16/INT8 stay off, so the provider builds from the graph's own types (the exported FP16 graph
carries them: AutoCast kept some nodes in FP32). On TensorRT 11 (the ``gpu`` extra, onnxruntime >= 1.27)
every network is strongly typed, so those nodes stay FP32 and the FP16 nodes run in FP16. On TensorRT 10
(``gpu-trt10``) onnxruntime's provider builds a weakly typed network: the graph's types are then only
hints, and with FP16 off the builder may run the FP16 nodes in FP32, so an ``ort-trt`` fp16 result there
is close to the FP32 graph's rather than the FP16 arithmetic the ``tensorrt`` backend's (strongly typed)
engine runs.

Engine / timing cache. onnxruntime creates the cache folder itself with one ``create_directory``
call (one level), so a folder whose parent does not exist makes session creation fail: each model
gets one flat folder (:func:`ort_trt_cache_folder`) directly under a folder that exists.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from diffgap.core.iospec import IOSpec

CACHE_PREFIX = "diffgap_ort_trt_"
# Triton's onnxruntime backend: `precision_mode` FP32 | FP16 | INT8 | BF16 stands for the provider's
# trt_{fp16,int8,bf16}_enable; every other option used here keeps the provider's own name there.
TRITON_PRECISION_KEYS = {"trt_fp16_enable": "FP16", "trt_int8_enable": "INT8"}


def ort_trt_profile_shapes(io: IOSpec) -> dict[str, str]:
    """The IOSpec's min/opt/max input shapes as ORT TensorRT provider options
    (``trt_profile_{min,opt,max}_shapes``, ``"name:1x512,other:1x1"``): one explicit profile, so the
    provider builds one engine for the declared batch range instead of rebuilding as batches grow."""
    cols: list[list[str]] = [[], [], []]
    for t in io.inputs:
        for col, shape in zip(cols, io.profile(t.name)):
            col.append(f"{t.name}:{'x'.join(str(int(d)) for d in shape)}")
    return {f"trt_profile_{k}_shapes": ",".join(c) for k, c in zip(("min", "opt", "max"), cols)}


def ort_trt_cache_folder(parent: str | Path, model: str) -> str:
    """``<parent>/diffgap_ort_trt_<model>``: one folder per model, one level below ``parent`` (which must exist)."""
    return str(PurePosixPath(parent) / f"{CACHE_PREFIX}{model}")  # a path inside the server: POSIX


def ort_trt_options(io: IOSpec, cache_dir: str | Path) -> dict[str, Any]:
    """onnxruntime TensorRT provider options for an exported graph (module docstring: typing, cache).

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


def triton_accelerator_parameters(io: IOSpec, cache_dir: str | Path) -> dict[str, str]:
    """:func:`ort_trt_options` spelled as the parameters of Triton's ``tensorrt`` GPU execution accelerator
    (onnxruntime backend): booleans "1"/"0", the precision flags as ``precision_mode``."""
    opts = ort_trt_options(io, cache_dir)
    modes = [mode for key, mode in TRITON_PRECISION_KEYS.items() if opts.pop(key)]
    if len(modes) > 1:
        raise ValueError(f"Triton's precision_mode takes one mode, not {modes}")
    params = {"precision_mode": modes[0] if modes else "FP32"}
    params.update({k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in opts.items()})
    return params
