"""The pieces of a model's config dict (the protobuf's JSON shape; :mod:`.pbtxt` writes it out).

Per-tensor entries read from the exported modules' IOSpec declarations, string parameters, dynamic
batching sizes, ensemble steps, and the configuration of an exported graph in the gpu flavour
(``tensorrt_plan`` or ``onnxruntime_onnx`` with the TensorRT accelerator).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from diffgap.core.iospec import IOSpec, TensorSpec, triton_dtype

from .pbtxt import Enum


# -- tensors, parameters, batching ----------------------------------------------------------------
def tensor_config(t: TensorSpec, name: str | None = None, optional: bool | None = None) -> dict[str, Any]:
    """One ``input``/``output`` entry from its declaration (Triton's dims omit the batch axis)."""
    d: dict[str, Any] = {"name": name or t.name, "data_type": Enum(triton_dtype(t.dtype)), "dims": list(t.feature_shape)}
    if (t.optional if optional is None else optional):
        d["optional"] = True
    return d


def string_tensor(name: str, dims: Sequence[int], optional: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "data_type": Enum("TYPE_STRING"), "dims": list(dims)}
    if optional:
        d["optional"] = True
    return d


def parameters(**kv: Any) -> dict[str, dict[str, str]]:
    """``parameters`` (map<string, ModelParameter>) of string values."""
    return {k: {"string_value": str(v)} for k, v in kv.items()}


def preferred_sizes(io: IOSpec, max_batch: int) -> list[int]:
    return sorted({b for b in (io.opt_batch, max_batch) if 1 <= b <= max_batch})


def ensemble_step(model: str, input_map: Mapping[str, str], output_map: Mapping[str, str]) -> dict[str, Any]:
    return {
        "model_name": model,
        "model_version": -1,
        "input_map": [{"key": k, "value": v} for k, v in input_map.items()],
        "output_map": [{"key": k, "value": v} for k, v in output_map.items()],
    }


# -- an exported graph in the gpu flavour -----------------------------------------------------------
def ort_trt_accelerator(io: IOSpec, cache_dir: str) -> dict[str, Any]:
    """Triton's ``tensorrt`` GPU execution accelerator for an ``onnxruntime_onnx`` model: the options
    ``open_model(..., backend="ort-trt")`` gives onnxruntime, in the backend's spelling
    (:func:`diffgap.runtime.ort_trt.triton_accelerator_parameters`, declared once there)."""
    from diffgap.runtime.ort_trt import triton_accelerator_parameters

    return {"name": "tensorrt", "parameters": triton_accelerator_parameters(io, cache_dir)}


def gpu_graph_config(
    name: str, io: IOSpec, platform: str, *, instances: int, queue_delay_us: int, ort_trt_cache_dir: str,
) -> dict[str, Any]:
    """``KIND_GPU`` config of one exported graph: a ``tensorrt_plan`` engine (every input bound, one
    CUDA graph per preferred batch size) or ``onnxruntime_onnx`` with the TensorRT accelerator."""
    from diffgap.runtime.ort_trt import ort_trt_cache_folder

    sizes = preferred_sizes(io, io.max_batch)
    plan = platform == "tensorrt_plan"
    return {
        "name": name, "platform": platform, "max_batch_size": io.max_batch,
        # A plan binds every input: optional ones are always fed by the noise model, so none is optional there.
        "input": [tensor_config(t, optional=False if plan else None) for t in io.inputs],
        "output": [tensor_config(t) for t in io.outputs],
        "instance_group": [{"count": instances, "kind": Enum("KIND_GPU")}],
        "dynamic_batching": {"preferred_batch_size": sizes, "max_queue_delay_microseconds": queue_delay_us},
        # Static feature dims: one CUDA graph per preferred batch size (Triton TensorRT backend).
        "optimization": {"cuda": {"graphs": True, "graph_spec": [{"batch_size": b} for b in sizes]}} if plan else
        {"execution_accelerators": {"gpu_execution_accelerator": [ort_trt_accelerator(io, ort_trt_cache_folder(ort_trt_cache_dir, name))]}},
    }
