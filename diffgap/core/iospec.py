"""One I/O declaration per exportable module.

Every exportable module (text encoder, audio encoder, video encoder, fused sampler) declares its
tensors exactly once as an :class:`IOSpec`. The ONNX exporter reads it for input/output names and
dynamic axes, the FP16 converter for which I/O stays FP32, the TensorRT builder for optimisation
profiles, the ORT/TRT sessions for feed checks, and the Triton generator for every ``config.pbtxt``.

This module is deliberately torch-free (numpy only): the runtime reads the same declaration back
from ``manifest.json`` via :meth:`IOSpec.from_dict`, so an edge box never needs torch.

Shapes use the symbol ``"batch"`` for the dynamic batch axis; every other dim is a fixed int.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from diffgap.core.names import encoder_name

BATCH = "batch"
# ``IOSpec.meta`` key mapping each tensor's *role* (what callers mean) to its declared name, so
# consumers look tensors up by role (:meth:`IOSpec.role`) and never retype a tensor name.
ROLES = "roles"

# The fused sampler's roles (export/fused.py declares which tensor plays each).
ROLE_CONDITION = "condition"    # input (B, E): frozen CLAP/CAVP embedding of the source modality
ROLE_NOISE = "noise"            # input (B, D): initial Gaussian noise
ROLE_GUIDANCE = "guidance_scale"  # optional input (B, 1): classifier-free guidance scale
ROLE_BRIDGED = "bridged"        # output (B, D): bridged L2-normalised target head-space embedding
ROLE_PROJECTED = "projected"    # output (B, D): the condition's own L2-normalised head-space embedding
# The generation sampler's output (export/generation.py): a bridged sample mapped back to the raw
# CLAP/CAVP space the generator is conditioned in.
ROLE_RAW_SAMPLE = "raw_sample"  # output (B, E): unit-norm target embedding in the frozen encoder's space

# The text encoder's roles (diffgap.encoders declares which tensor plays each; the tokenizer's
# output is keyed by them).
ROLE_TOKEN_IDS = "token_ids"            # input (B, L) int64: token ids, padded to the context length
ROLE_ATTENTION_MASK = "attention_mask"  # optional input (B, L) int64: 1 on real tokens, 0 on padding

# Batch profiles (min, opt, max) of the exported models: the TensorRT optimisation profile, the
# Triton max_batch_size/preferred sizes and the runtime's chunking all read them from the IOSpec.
# Encoders: the CLAP text tower is cheap per row (77 tokens); an audio row is a 10 s 48 kHz clip
# (480,000 samples through HTS-AT); a CAVP video row is 16 frames of 224 x 224 through a 3-D ResNet-50.
# The fused samplers (and the heads alone) work on (B, E) and (B, D) vectors, so their batch is bounded by
# the gallery queries, not memory.
BatchProfile = tuple[int, int, int]
DEFAULT_BATCH_PROFILE: BatchProfile = (1, 8, 64)
BATCH_PROFILES: dict[str, BatchProfile] = {
    encoder_name("text", "clap"): (1, 16, 128),
    encoder_name("audio", "clap"): (1, 8, 32),
    encoder_name("video", "cavp"): (1, 4, 16),
    encoder_name("audio", "cavp"): (1, 8, 64),
}
SAMPLER_BATCH_PROFILE: BatchProfile = (1, 16, 256)  # every fused sampler (diffgap_<source>_to_<target>)

# dtype name -> (numpy dtype, ONNX TensorProto enum value, Triton type). The ONNX enum values are
# fixed by onnx.proto (FLOAT=1, INT32=6, INT64=7, FLOAT16=10); written here so this stays onnx-free.
_DTYPES: dict[str, tuple[Any, int, str]] = {
    "float32": (np.float32, 1, "TYPE_FP32"),
    "float16": (np.float16, 10, "TYPE_FP16"),
    "int64": (np.int64, 7, "TYPE_INT64"),
    "int32": (np.int32, 6, "TYPE_INT32"),
}


def numpy_dtype(name: str) -> np.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return np.dtype(_DTYPES[name][0])


def onnx_elem_type(name: str) -> int:
    numpy_dtype(name)
    return _DTYPES[name][1]


def triton_dtype(name: str) -> str:
    numpy_dtype(name)
    return _DTYPES[name][2]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: ``shape`` holds ints and the symbol ``"batch"`` (always axis 0)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    optional: bool = False          # an input the caller may omit (it then takes ``default``)
    default: float | None = None    # value used when an optional input is omitted
    low: float | None = None        # sample-input range: ints drawn in [low, high), floats ~N(0,1)
    high: float | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        numpy_dtype(self.dtype)
        if not self.shape or self.shape[0] != BATCH:
            raise ValueError(f"tensor {self.name!r}: axis 0 must be {BATCH!r}, got shape {self.shape}")
        if any(s == BATCH for s in self.shape[1:]) or any(
            not isinstance(s, int) and s != BATCH for s in self.shape
        ):
            raise ValueError(f"tensor {self.name!r}: only axis 0 may be dynamic, got shape {self.shape}")

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape without the batch axis (what Triton's ``dims`` lists)."""
        return tuple(int(s) for s in self.shape[1:])

    def concrete(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.feature_shape)

    def dynamic_axes(self) -> dict[int, str]:
        return {0: BATCH}

    def sample(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        shape = self.concrete(batch)
        if self.np_dtype.kind in "iu":
            lo = int(self.low if self.low is not None else 0)
            hi = int(self.high if self.high is not None else 2)
            return rng.integers(lo, hi, size=shape).astype(self.np_dtype)
        x = rng.standard_normal(shape)
        if self.low is not None or self.high is not None:
            x = np.clip(x, self.low, self.high)
        return x.astype(self.np_dtype)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        for k in ("optional", "default", "low", "high", "doc"):
            v = getattr(self, k)
            if not (v is None or v is False or v == ""):  # keep 0.0 (0.0 == False)
                d[k] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(
            name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]),
            optional=bool(d.get("optional", False)), default=d.get("default"),
            low=d.get("low"), high=d.get("high"), doc=d.get("doc", ""),
        )


@dataclass(frozen=True)
class IOSpec:
    """The whole I/O contract of one exportable module, plus its batch profile (min/opt/max)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    min_batch: int = DEFAULT_BATCH_PROFILE[0]
    opt_batch: int = DEFAULT_BATCH_PROFILE[1]
    max_batch: int = DEFAULT_BATCH_PROFILE[2]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise ValueError(
                f"{self.name}: need 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: tensor names must be unique, got {names}")
        roles = self.meta.get(ROLES)
        if roles is not None:
            if not isinstance(roles, Mapping) or not all(isinstance(v, str) for v in roles.values()):
                raise ValueError(f"{self.name}: meta[{ROLES!r}] must map role -> tensor name, got {roles!r}; re-export")
            unknown = {r: n for r, n in roles.items() if n not in names}
            if unknown:
                raise ValueError(f"{self.name}: roles {unknown} name no declared tensor (tensors: {names}); re-export")

    # -- lookups ---------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name}: no input named {name!r}; inputs are {self.input_names}")

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name}: no output named {name!r}; outputs are {self.output_names}")

    def has_role(self, role: str) -> bool:
        """Whether a tensor plays ``role`` (e.g. an optional input the export left out)."""
        return role in self._roles()

    def role(self, role: str) -> TensorSpec:
        """The input or output tensor that plays ``role`` (``meta["roles"]``: role -> tensor name)."""
        roles = self._roles()
        if role not in roles:
            raise ValueError(f"{self.name}: no tensor plays role {role!r} (roles: {sorted(roles)}); re-export with this diffgap version")
        for t in (*self.inputs, *self.outputs):
            if t.name == roles[role]:
                return t
        raise ValueError(f"{self.name}: role {role!r} names {roles[role]!r}, which is not declared; re-export")

    def _roles(self) -> Mapping[str, str]:
        roles = self.meta.get(ROLES)
        if roles is None:
            raise ValueError(
                f"{self.name}: this export predates tensor roles (no meta[{ROLES!r}] in its I/O declaration); "
                "re-export with `diffgap export`"
            )
        return roles

    # -- what export / engines read --------------------------------------------------------
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` argument."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs)}

    def profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """TensorRT optimisation-profile (min, opt, max) shapes for input ``name``."""
        t = self.input(name)
        return t.concrete(self.min_batch), t.concrete(self.opt_batch), t.concrete(self.max_batch)

    def sample_inputs(self, batch: int, seed: int = 0, include_optional: bool = True) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            t.name: t.sample(batch, rng)
            for t in self.inputs
            if include_optional or not t.optional
        }

    # -- what sessions read ----------------------------------------------------------------
    def check_feeds(self, feeds: Mapping[str, np.ndarray], allow_missing_optional: bool = True) -> int:
        """Validate a feed dict against this declaration; return the batch size.

        Raises ``ValueError`` with one line naming the tensor, the problem and the fix.
        """
        if not isinstance(feeds, Mapping):
            raise ValueError(f"{self.name}: feeds must be a dict of name -> numpy array, got {type(feeds).__name__}")
        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            raise ValueError(f"{self.name}: unknown input(s) {unknown}; expected {self.input_names}")
        batch: int | None = None
        for t in self.inputs:
            if t.name not in feeds:
                if t.optional and allow_missing_optional:
                    continue
                raise ValueError(f"{self.name}: missing input {t.name!r} {list(t.shape)} {t.dtype}")
            x = feeds[t.name]
            if not isinstance(x, np.ndarray):
                raise ValueError(f"{self.name}: input {t.name!r} must be a numpy array, got {type(x).__name__}")
            if x.dtype != t.np_dtype:
                raise ValueError(
                    f"{self.name}: input {t.name!r} has dtype {x.dtype}, expected {t.dtype}; "
                    f"convert with .astype(np.{t.dtype})"
                )
            if x.ndim != len(t.shape):
                raise ValueError(
                    f"{self.name}: input {t.name!r} has rank {x.ndim} (shape {x.shape}), expected rank "
                    f"{len(t.shape)} {list(t.shape)}"
                )
            if tuple(x.shape[1:]) != t.feature_shape:
                raise ValueError(
                    f"{self.name}: input {t.name!r} has shape {x.shape}, expected {list(t.shape)}"
                )
            b = int(x.shape[0])
            if batch is None:
                batch = b
            elif b != batch:
                raise ValueError(f"{self.name}: input {t.name!r} has batch {b} but other inputs have {batch}")
            if x.dtype.kind == "f" and x.size and not np.isfinite(x).all():
                row = int(np.argwhere(~np.isfinite(x.reshape(b, -1)))[0][0])
                raise ValueError(f"{self.name}: input {t.name!r} contains NaN/Inf (first at row {row}); clean the input")
        if batch is None:
            raise ValueError(f"{self.name}: no inputs given; expected {self.input_names}")
        if not (self.min_batch <= batch <= self.max_batch):
            raise ValueError(
                f"{self.name}: batch {batch} is outside the declared profile "
                f"[{self.min_batch}, {self.max_batch}]; split the request or re-export with a larger max_batch"
            )
        return batch

    # -- serialisation (manifest.json / ONNX metadata) -------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "min_batch": self.min_batch,
            "opt_batch": self.opt_batch,
            "max_batch": self.max_batch,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IOSpec":
        try:
            return cls(
                name=d["name"],
                inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                min_batch=int(d.get("min_batch", DEFAULT_BATCH_PROFILE[0])),
                opt_batch=int(d.get("opt_batch", DEFAULT_BATCH_PROFILE[1])),
                max_batch=int(d.get("max_batch", DEFAULT_BATCH_PROFILE[2])),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed I/O declaration ({e!r}); re-export with `diffgap export`") from e

    def with_batch(self, min_batch: int, opt_batch: int, max_batch: int) -> "IOSpec":
        return IOSpec(self.name, self.inputs, self.outputs, min_batch, opt_batch, max_batch, dict(self.meta))
