"""Triton ``config.pbtxt`` files, written through Triton's own ``ModelConfig`` protobuf.

The repository generator composes each model's configuration as a plain dict in the protobuf's
JSON shape (field names as in ``model_config.proto``; enum values by name, e.g. ``"TYPE_FP32"``).
:func:`model_config` turns it into ``tritonclient.grpc.model_config_pb2.ModelConfig`` (an unknown
field, a wrong type or an unknown enum value is an error here, not at server start-up) and
:func:`config_text` prints it with ``google.protobuf.text_format``: the same parser Triton uses
reads it back.

Map fields (``parameters``, an ensemble step's ``input_map``/``output_map``, an accelerator's
``parameters``) may be given as dicts or as lists of ``{"key": ..., "value": ...}`` entries.

Also here: the per-tensor helpers shared by every model, and the configuration of an exported graph
in the gpu flavour (``tensorrt_plan`` or ``onnxruntime_onnx`` with the TensorRT accelerator).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from diffgap.core.iospec import IOSpec, TensorSpec, triton_dtype

INSTALL_HINT = "`pip install 'tritonclient[grpc]'` (part of `pip install -e .[serving]`)"


class Enum(str):
    """A protobuf enum value by name, e.g. ``TYPE_FP32``, ``KIND_GPU`` (a plain str works too)."""


def _protobuf() -> tuple[Any, Any, Any]:
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ImportError(f"writing Triton model configs needs Triton's model config protobuf: {INSTALL_HINT}") from e
    return model_config_pb2, json_format, text_format


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6.31; label() is deprecated there
    if flag is not None:
        return bool(flag() if callable(flag) else flag)
    return field.label == field.LABEL_REPEATED


def _normalise(msg: Mapping[str, Any], descriptor: Any) -> dict[str, Any]:
    """``msg`` with every map field as a dict (json_format's form), recursively."""
    out: dict[str, Any] = {}
    for key, value in msg.items():
        if value is None:
            continue
        field = descriptor.fields_by_name.get(key)
        if field is None or field.message_type is None:
            out[key] = value  # a scalar, or an unknown key that ParseDict reports
            continue
        if _is_map(field):
            entries = value.items() if isinstance(value, Mapping) else ((e["key"], e["value"]) for e in value)
            vfield = field.message_type.fields_by_name["value"]
            out[key] = {
                k: _normalise(v, vfield.message_type) if vfield.message_type is not None else v for k, v in entries
            }
        elif _is_repeated(field):
            out[key] = [_normalise(v, field.message_type) for v in value]
        else:
            out[key] = _normalise(value, field.message_type)
    return out


def model_config(cfg: Mapping[str, Any] | Any) -> Any:
    """A ``ModelConfig`` message from a config dict (or the message itself, unchanged)."""
    pb2, json_format, _ = _protobuf()
    if isinstance(cfg, pb2.ModelConfig):
        return cfg
    try:
        return json_format.ParseDict(_normalise(cfg, pb2.ModelConfig.DESCRIPTOR), pb2.ModelConfig())
    except json_format.ParseError as e:
        raise ValueError(f"model config {cfg.get('name', '?')!r} is not a valid Triton ModelConfig: {e}") from e


def config_text(cfg: Mapping[str, Any] | Any) -> str:
    """``config.pbtxt`` text of a config dict or ``ModelConfig`` message (protobuf text format)."""
    _, _, text_format = _protobuf()
    return text_format.MessageToString(model_config(cfg))


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
