"""Triton ``config.pbtxt`` files, written through Triton's own ``ModelConfig`` protobuf.

The repository generator composes each model's configuration as a plain dict in the protobuf's
JSON shape (field names as in ``model_config.proto``; enum values by name, e.g. ``"TYPE_FP32"``).
:func:`model_config` turns it into ``tritonclient.grpc.model_config_pb2.ModelConfig`` (an unknown
field, a wrong type or an unknown enum value is an error here, not at server start-up) and
:func:`config_text` prints it with ``google.protobuf.text_format``: the same parser Triton uses
reads it back.

Map fields (``parameters``, an ensemble step's ``input_map``/``output_map``, an accelerator's
``parameters``) may be given as dicts or as lists of ``{"key": ..., "value": ...}`` entries.

The dicts themselves are composed from the pieces in :mod:`.model_config`.
"""
from __future__ import annotations

from typing import Any, Mapping

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
