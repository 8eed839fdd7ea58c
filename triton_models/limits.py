"""The largest legal request of a Triton model repository, computed from its I/O declarations.

The body-size limit the serving proxy enforces (:mod:`.proxy`) is derived here, per protocol, from
every model's ``config.pbtxt`` (ensembles and composing models alike: each is reachable by name):

    max_batch_size x sum over inputs (elements per row x bytes per element in the encoding)

taking, for each model, the most expensive encoding a client may legally use:

- HTTP/REST: the JSON encoding (KServe v2 ``data`` lists) or Triton's binary-tensor extension
  (raw little-endian bytes; ``BYTES`` elements as a 4-byte length + the bytes);
- gRPC: ``raw_input_contents`` (raw bytes) or the typed ``contents`` fields (int64 as varints of up
  to 10 bytes, strings as tag + length + bytes).

Bytes per element in JSON are the longest text a client library writes for that type, with its
``", "`` separator: a float32 widened to float64 and printed by ``repr`` takes at most 24 characters
(``-1.1754943508222875e-38``), an int64 at most 20. A string's bound is the largest
``max_text_bytes`` parameter of the repository (the caption limit the tokenizer enforces; a longer
one is refused anyway), escaped as ``\\uXXXX`` (6 characters per byte) in the worst case.

Headroom on top (``HEADROOM_FACTOR`` x, plus ``HEADROOM_BYTES`` for the JSON header, output
requests and parameters) keeps every legal request well inside the limit.
A dimension of ``-1`` or a string input with no declared bound has no largest legal size: then the
limit must be given explicitly (``diffgap serve --max-body-size``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HEADROOM_FACTOR = 1.25
HEADROOM_BYTES = 1 << 20
STRING_BOUND_PARAM = "max_text_bytes"

# Raw (binary extension / raw_input_contents) bytes per element.
_RAW = {
    "TYPE_BOOL": 1, "TYPE_UINT8": 1, "TYPE_INT8": 1, "TYPE_UINT16": 2, "TYPE_INT16": 2, "TYPE_FP16": 2,
    "TYPE_BF16": 2, "TYPE_UINT32": 4, "TYPE_INT32": 4, "TYPE_FP32": 4, "TYPE_UINT64": 8, "TYPE_INT64": 8,
    "TYPE_FP64": 8,
}
_JSON_FLOAT = 24 + 2  # repr of a float64 ("-1.1754943508222875e-38") + ", "
_JSON_INT = 20 + 2    # "-9223372036854775808" + ", "
_JSON_BOOL = 5 + 2    # "false, "
_VARINT_MAX = 10      # protobuf varint of a 64-bit (or sign-extended negative 32-bit) integer


class UnboundedInput(ValueError):
    """A model input with no largest legal size (a -1 dimension, an unbounded string)."""


@dataclass(frozen=True)
class RequestLimits:
    """Body-size limits in bytes, and where the largest legal request comes from."""

    http_bytes: int
    grpc_bytes: int
    largest_http: tuple[str, int]  # (model, legal bytes before headroom)
    largest_grpc: tuple[str, int]

    def describe(self) -> str:
        return (f"HTTP bodies up to {self.http_bytes / 1e6:.1f} MB (largest legal: {self.largest_http[0]}, "
                f"{self.largest_http[1] / 1e6:.1f} MB), gRPC messages up to {self.grpc_bytes / 1e6:.1f} MB "
                f"(largest legal: {self.largest_grpc[0]}, {self.largest_grpc[1] / 1e6:.1f} MB)")


def _element_bytes(dtype: str, string_bound: int | None, model: str, name: str) -> tuple[int, int, int]:
    """(JSON, binary extension, gRPC) bytes for one element of ``dtype``."""
    if dtype == "TYPE_STRING":
        if string_bound is None:
            raise UnboundedInput(f"{model}: string input {name!r} has no declared bound ({STRING_BOUND_PARAM} parameter)")
        n = string_bound
        return 6 * n + 4, 4 + n, 1 + 5 + n
    if dtype not in _RAW:
        raise UnboundedInput(f"{model}: input {name!r} has data type {dtype}, which has no known encoding size")
    raw = _RAW[dtype]
    if dtype.startswith(("TYPE_FP", "TYPE_BF")):
        return _JSON_FLOAT, raw, raw  # typed fp contents are packed fixed-width (fp16/bf16 travel raw)
    if dtype == "TYPE_BOOL":
        return _JSON_BOOL, raw, raw
    return _JSON_INT, raw, max(raw, _VARINT_MAX)


def _configs(repo: Path) -> list:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out = []
    for p in sorted(Path(repo).glob("*/config.pbtxt")):
        cfg = text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
        if not cfg.name:
            cfg.name = p.parent.name
        out.append(cfg)
    return out


def string_bound(configs: list) -> int | None:
    """The largest ``max_text_bytes`` parameter among the models (None: no model declares one)."""
    bounds = [int(c.parameters[STRING_BOUND_PARAM].string_value) for c in configs if STRING_BOUND_PARAM in c.parameters]
    return max(bounds) if bounds else None


def model_request_bytes(cfg, strings: int | None) -> tuple[int, int, int]:
    """(JSON, binary, gRPC) bytes of the largest legal request to one model, before headroom."""
    from tritonclient.grpc import model_config_pb2

    batch = max(int(cfg.max_batch_size), 1)
    totals = [0, 0, 0]
    for inp in cfg.input:
        dims = list(inp.dims)
        if any(d < 0 for d in dims):
            raise UnboundedInput(f"{cfg.name}: input {inp.name!r} has a variable dimension {dims}")
        n = batch
        for d in dims:
            n *= d
        per = _element_bytes(model_config_pb2.DataType.Name(inp.data_type), strings, cfg.name, inp.name)
        for i in range(3):
            totals[i] += n * per[i]
    return totals[0], totals[1], totals[2]


def request_limits(repo: str | Path) -> RequestLimits:
    """Limits for every model of ``repo`` (raises :class:`UnboundedInput` when one cannot be bounded)."""
    configs = _configs(Path(repo))
    if not configs:
        raise FileNotFoundError(f"{repo} holds no */config.pbtxt; it is not a model repository")
    strings = string_bound(configs)
    best_http, best_grpc = ("", 0), ("", 0)
    for cfg in configs:
        js, binary, grpc = model_request_bytes(cfg, strings)
        if max(js, binary) > best_http[1]:
            best_http = (cfg.name, max(js, binary))
        if grpc > best_grpc[1]:
            best_grpc = (cfg.name, grpc)
    return RequestLimits(
        http_bytes=with_headroom(best_http[1]), grpc_bytes=with_headroom(best_grpc[1]),
        largest_http=best_http, largest_grpc=best_grpc,
    )


def with_headroom(n: int) -> int:
    return int(n * HEADROOM_FACTOR) + HEADROOM_BYTES
