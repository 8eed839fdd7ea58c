"""Request classes for the serving fuzz and load tests, generated from a model's served config.

Every model of a repository (ensembles and python models alike) gets the classes that fit its
inputs: a valid request, and the client mistakes -- missing / unknown input, batch above the
maximum, unknown output, wrong dtype, wrong feature shape, NaN / Inf in a float input, a negative
integer (seeds, token ids), and for strings an empty / blank / over-long caption, invalid UTF-8 and
a wrong shape. :data:`EXPECTED_WORDS` is the documented answer: every class is a client mistake,
answered HTTP 400 / gRPC INVALID_ARGUMENT (an unknown model: 404 / NOT_FOUND, see :data:`STATUS`),
with a message containing one of those words (lower case).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# class -> words the one-line message contains (lower case, any of them: Triton's core answers some
# classes before the model runs, the model's own validation the others); every class is HTTP 400 /
# gRPC INVALID_ARGUMENT.
EXPECTED_WORDS = {
    # Triton 2.51 counts inputs only: a required one left out while optional ones are sent reaches the
    # model (its own "missing input") or, in an ensemble, stalls its first step ("unexpected deadlock").
    "missing input": ("but got", "missing input", "unexpected deadlock"),
    "unknown input": ("but got", "unknown input"),
    "batch above max": "batch-size must be <=",
    "unknown output": "unexpected inference output",
    "unknown model": "unknown model",
    "wrong dtype": "data-type",
    "wrong shape": "shape",
    "nan": "nan",
    "inf": "nan/inf",
    "negative": ("negative", "outside its declared range"),
    "empty string": "empty caption",
    "blank string": "empty caption",
    "long string": "exceeds the limit",
    "invalid utf-8": "not valid utf-8",
    "string shape": "shape",
}
VALID_TEXT = "a dog barks in the distance"


def words(kind: str) -> tuple[str, ...]:
    w = EXPECTED_WORDS[kind]
    return (w,) if isinstance(w, str) else w


# Classes answered otherwise than 400 / INVALID_ARGUMENT (still a 4xx client status).
STATUS = {"unknown model": ("404", "StatusCode.NOT_FOUND")}
INVALID = ("400", "StatusCode.INVALID_ARGUMENT")


def is_documented_answer(kind: str, status: str, message: str) -> bool:
    """Whether a refused request got the documented status and message for its class."""
    return status in STATUS.get(kind, INVALID) and any(w in message.lower() for w in words(kind))


@dataclass
class Tensor:
    name: str
    datatype: str  # Triton wire type: FP32, INT64, BYTES ...
    array: np.ndarray


@dataclass
class Case:
    model: str
    kind: str  # "valid" or a key of EXPECTED_WORDS
    inputs: list[Tensor]
    outputs: list[str] = field(default_factory=list)  # requested outputs (empty: all)
    detail: str = ""

    @property
    def label(self) -> str:
        return f"{self.model}:{self.kind}{'(' + self.detail + ')' if self.detail else ''}"


_NP = {"TYPE_FP32": (np.float32, "FP32"), "TYPE_FP16": (np.float16, "FP16"), "TYPE_FP64": (np.float64, "FP64"),
       "TYPE_INT64": (np.int64, "INT64"), "TYPE_INT32": (np.int32, "INT32"), "TYPE_STRING": (np.object_, "BYTES")}


def _dims(inp: dict[str, Any]) -> list[int]:
    return [int(d) for d in inp.get("dims", [])]


def _valid_array(inp: dict[str, Any], batch: int, rng: np.random.Generator) -> np.ndarray:
    shape = [batch, *_dims(inp)]
    dt = inp["data_type"]
    if dt == "TYPE_STRING":
        return np.full(shape, VALID_TEXT.encode(), dtype=object)
    if dt.startswith("TYPE_FP"):
        if "guidance" in inp["name"]:
            return np.full(shape, 1.5, _NP[dt][0])
        return rng.uniform(-0.5, 0.5, shape).astype(_NP[dt][0])
    return np.ones(shape, _NP[dt][0])  # seeds, token ids: small valid integers


def _tensor(inp: dict[str, Any], arr: np.ndarray, datatype: str | None = None) -> Tensor:
    return Tensor(inp["name"], datatype or _NP[inp["data_type"]][1], arr)


def valid_inputs(config: dict[str, Any], batch: int = 1, seed: int = 0, optional: bool = True) -> list[Tensor]:
    rng = np.random.default_rng(seed)
    return [_tensor(i, _valid_array(i, batch, rng)) for i in config["input"] if optional or not i.get("optional")]


def cases(config: dict[str, Any], max_text_bytes: int) -> list[Case]:
    """Every class that fits ``config``'s inputs (Triton's JSON model config)."""
    name, max_batch = config["name"], int(config.get("max_batch_size", 0))
    base = valid_inputs(config)
    out = [Case(name, "valid", base)]
    required = [i for i in config["input"] if not i.get("optional")]
    if required:
        out.append(Case(name, "missing input", [t for t in base if t.name != required[0]["name"]], detail=required[0]["name"]))
    out.append(Case(name, "unknown input", [*base, Tensor("no_such_input", "FP32", np.zeros((1, 1), np.float32))]))
    if max_batch:
        out.append(Case(name, "batch above max", valid_inputs(config, batch=max_batch + 1, optional=False)))
    out.append(Case(name, "unknown output", base, outputs=["no_such_output"]))
    rng = np.random.default_rng(1)
    for k, inp in enumerate(config["input"]):
        dt = inp["data_type"]

        def swap(t: Tensor, k=k) -> list[Tensor]:
            return [t if j == k else b for j, b in enumerate(base)]

        good = base[k].array
        if dt == "TYPE_STRING":
            for kind, text in (("empty string", b""), ("blank string", b"   "), ("long string", b"x" * (max_text_bytes + 1)),
                               ("invalid utf-8", b"caf\xe9 \xff")):
                out.append(Case(name, kind, swap(_tensor(inp, np.full(good.shape, text, dtype=object))), detail=inp["name"]))
            out.append(Case(name, "string shape", swap(_tensor(inp, np.full((1, good.shape[-1] + 1), b"a dog", dtype=object))), detail=inp["name"]))
            continue
        wrong = (np.float64, "FP64") if dt != "TYPE_FP64" else (np.float32, "FP32")
        out.append(Case(name, "wrong dtype", swap(Tensor(inp["name"], wrong[1], good.astype(wrong[0]))), detail=inp["name"]))
        if _dims(inp) and _dims(inp)[-1] > 0:
            bigger = _valid_array({**inp, "dims": [*_dims(inp)[:-1], _dims(inp)[-1] + 1]}, 1, rng)
            out.append(Case(name, "wrong shape", swap(_tensor(inp, bigger)), detail=inp["name"]))
        if dt.startswith("TYPE_FP"):
            for kind, v in (("nan", np.nan), ("inf", np.inf)):
                bad = good.copy()
                bad.flat[bad.size // 2] = v
                out.append(Case(name, kind, swap(_tensor(inp, bad)), detail=inp["name"]))
        else:
            out.append(Case(name, "negative", swap(_tensor(inp, np.full(good.shape, -3, good.dtype))), detail=inp["name"]))
    return out


def client_inputs(module, tensors: list[Tensor], binary: bool = True) -> list:
    """tritonclient InferInputs (``module`` is tritonclient.http or tritonclient.grpc)."""
    out = []
    for t in tensors:
        x = module.InferInput(t.name, list(t.array.shape), t.datatype)
        if module.__name__.endswith("http"):
            x.set_data_from_numpy(t.array, binary_data=binary)
        else:
            x.set_data_from_numpy(t.array)
        out.append(x)
    return out
