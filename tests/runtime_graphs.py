"""Small real ONNX graphs (built with ``onnx.helper``) laid out as a diffgap export directory.

Used by the runtime tests so that sessions, pipelines, the index and the CLIs run against real
onnxruntime sessions and a real ``manifest.json`` without needing torch. The graphs have the exact
I/O contract of the exported models (names, dtypes, batch axis, optional guidance input, the
sampler's two outputs); their bodies are small deterministic numpy-reproducible maps, so tests can
also compute the expected outputs with numpy (:func:`reference_sampler`, ...).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from diffgap.core.iospec import (
    BATCH, ROLE_BRIDGED, ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLE_PROJECTED, ROLE_TOKEN_IDS, ROLES, IOSpec,
    TensorSpec,
)
from diffgap.core.manifest import Manifest, ModelEntry

OPSET = 17
CONTEXT = 77
VOCAB = 49408
E, D = 16, 8            # CLAP-space dim, head-space dim (tiny)
WAVE = 480000           # the real CLAP clip length, so diffgap.core.audio's waveforms fit
WAVE_FRAMES = 1000      # waveform -> (B, 1000, 480) frame means -> linear map


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "proj": (rng.standard_normal((E, D)) / np.sqrt(E)).astype(np.float32),
        "mix": (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32),
        "nmix": (rng.standard_normal((D, D)) / np.sqrt(D) * 0.3).astype(np.float32),
        "tok": (rng.standard_normal((VOCAB, E)) * 0.5).astype(np.float32),
        "wav": (rng.standard_normal((WAVE_FRAMES, E)) * 10).astype(np.float32),
    }


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- numpy references -----------------------------------------------------------------------
def reference_sampler(cond: np.ndarray, noise: np.ndarray, g: np.ndarray | float = 1.0, seed: int = 0):
    w = _weights(seed)
    src = _l2n(cond @ w["proj"])
    x = np.tanh(src @ w["mix"] + noise @ w["nmix"]) * np.asarray(g, np.float32).reshape(-1, 1)
    return _l2n(x).astype(np.float32), src.astype(np.float32)


def reference_text(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    return _l2n(_weights(seed)["tok"][ids].mean(axis=1)).astype(np.float32)


def reference_audio(wave: np.ndarray, seed: int = 0) -> np.ndarray:
    frames = wave.reshape(wave.shape[0], WAVE_FRAMES, -1).mean(axis=2)
    return _l2n(frames @ _weights(seed)["wav"]).astype(np.float32)


# -- I/O declarations (the same names as the exported models) ---------------------------------
def sampler_io(source: str, target: str, max_batch: int = 16) -> IOSpec:
    condition = TensorSpec("condition", "float32", (BATCH, E))
    noise = TensorSpec("noise", "float32", (BATCH, D))
    # sample values in [1, 3]: a per-row scale near 0 would push fp16 products into subnormals
    guidance = TensorSpec("guidance_scale", "float32", (BATCH, 1), optional=True, default=1.0, low=1.0, high=3.0)
    bridged, projected = TensorSpec("embedding", "float32", (BATCH, D)), TensorSpec("source_embedding", "float32", (BATCH, D))
    roles = {ROLE_CONDITION: condition, ROLE_NOISE: noise, ROLE_GUIDANCE: guidance, ROLE_BRIDGED: bridged, ROLE_PROJECTED: projected}
    return IOSpec(
        name=f"diffgap_{source}_to_{target}",
        inputs=(condition, noise, guidance),
        outputs=(bridged, projected),
        min_batch=1, opt_batch=4, max_batch=max_batch,
        meta={"steps": 4, ROLES: {role: t.name for role, t in roles.items()}},
    )


def text_io(max_batch: int = 16) -> IOSpec:
    return IOSpec(
        name="clap_text_encoder",
        inputs=(TensorSpec("input_ids", "int64", (BATCH, CONTEXT), low=0, high=VOCAB),),
        outputs=(TensorSpec("embedding", "float32", (BATCH, E)),),
        min_batch=1, opt_batch=4, max_batch=max_batch, meta={"tokenizer": "clip-bpe", ROLES: {ROLE_TOKEN_IDS: "input_ids"}},
    )


def audio_io(max_batch: int = 4) -> IOSpec:
    return IOSpec(
        name="clap_audio_encoder",
        inputs=(TensorSpec("waveform", "float32", (BATCH, WAVE), low=-1.0, high=1.0),),
        outputs=(TensorSpec("embedding", "float32", (BATCH, E)),),
        min_batch=1, opt_batch=2, max_batch=max_batch, meta={"sample_rate": 48000},
    )


# -- graph building ---------------------------------------------------------------------------
def _vi(t: TensorSpec) -> onnx.ValueInfoProto:
    elem = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}[t.dtype]
    return helper.make_tensor_value_info(t.name, elem, [BATCH if s == BATCH else s for s in t.shape])


def _model(io: IOSpec, nodes, inits, fp16: bool) -> onnx.ModelProto:
    from diffgap.runtime.session import ONNX_IO_SPEC_KEY
    import json

    graph = helper.make_graph(nodes, io.name, [_vi(t) for t in io.inputs], [_vi(t) for t in io.outputs], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="diffgap-tests")
    m.ir_version = 9
    helper.set_model_props(m, {ONNX_IO_SPEC_KEY: json.dumps(io.to_dict()), "precision": "fp16" if fp16 else "fp32"})
    onnx.checker.check_model(m, full_check=True)
    return m


def _normalize(x: str, out: str, tag: str) -> list:
    return [
        helper.make_node("ReduceL2", [x], [f"{tag}_n"], axes=[1], keepdims=1),
        helper.make_node("Div", [x, f"{tag}_n"], [out]),
    ]


def _in_cast(name: str, fp16: bool) -> tuple[list, str]:
    if not fp16:
        return [], name
    return [helper.make_node("Cast", [name], [name + "_h"], to=TensorProto.FLOAT16)], name + "_h"


def _out_cast(name: str, out: str, fp16: bool) -> list:
    return [helper.make_node("Cast", [name], [out], to=TensorProto.FLOAT)] if fp16 else [helper.make_node("Identity", [name], [out])]


def _init(name: str, a: np.ndarray, fp16: bool) -> onnx.TensorProto:
    return numpy_helper.from_array(a.astype(np.float16 if fp16 and a.dtype == np.float32 else a.dtype), name)


def sampler_model(source: str, target: str, fp16: bool = False, seed: int = 0, max_batch: int = 16) -> onnx.ModelProto:
    io, w = sampler_io(source, target, max_batch), _weights(seed)
    n0, c = _in_cast(io.role(ROLE_CONDITION).name, fp16)
    n1, z = _in_cast(io.role(ROLE_NOISE).name, fp16)
    n2, g = _in_cast(io.role(ROLE_GUIDANCE).name, fp16)
    nodes = [*n0, *n1, *n2,
             helper.make_node("MatMul", [c, "W_proj"], ["p"]), *_normalize("p", "src", "s"),
             helper.make_node("MatMul", ["src", "W_mix"], ["a"]), helper.make_node("MatMul", [z, "W_nmix"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Tanh", ["ab"], ["t"]),
             helper.make_node("Mul", ["t", g], ["tg"]), *_normalize("tg", "emb", "e"),
             *_out_cast("emb", io.role(ROLE_BRIDGED).name, fp16), *_out_cast("src", io.role(ROLE_PROJECTED).name, fp16)]
    inits = [_init("W_proj", w["proj"], fp16), _init("W_mix", w["mix"], fp16), _init("W_nmix", w["nmix"], fp16)]
    return _model(io, nodes, inits, fp16)


def text_model(fp16: bool = False, seed: int = 0, max_batch: int = 16) -> onnx.ModelProto:
    io, w = text_io(max_batch), _weights(seed)
    nodes = [helper.make_node("Gather", ["W_tok", io.inputs[0].name], ["emb3"], axis=0),
             helper.make_node("ReduceMean", ["emb3"], ["m"], axes=[1], keepdims=0), *_normalize("m", "y", "n"),
             *_out_cast("y", io.outputs[0].name, fp16)]
    return _model(io, nodes, [_init("W_tok", w["tok"], fp16)], fp16)


def audio_model(fp16: bool = False, seed: int = 0, max_batch: int = 4) -> onnx.ModelProto:
    io, w = audio_io(max_batch), _weights(seed)
    n0, x = _in_cast(io.inputs[0].name, fp16)
    shape = numpy_helper.from_array(np.array([0, WAVE_FRAMES, WAVE // WAVE_FRAMES], np.int64), "frames_shape")
    nodes = [*n0, helper.make_node("Reshape", [x, "frames_shape"], ["fr"]),
             helper.make_node("ReduceMean", ["fr"], ["fm"], axes=[2], keepdims=0),
             helper.make_node("MatMul", ["fm", "W_wav"], ["p"]), *_normalize("p", "y", "n"),
             *_out_cast("y", io.outputs[0].name, fp16)]
    return _model(io, nodes, [shape, _init("W_wav", w["wav"], fp16)], fp16)


def have_clip_vocab() -> bool:
    """Whether laion-clap's vocabulary file (the tokenizer asset) is installed here."""
    from diffgap.core.tokenizer import bundled_clip_vocab

    try:
        bundled_clip_vocab()
    except FileNotFoundError:
        return False
    return True


def make_export(root: str | Path, seed: int = 0, sampler_max_batch: int = 16, tokenizer: bool = True) -> Manifest:
    """Write a complete export directory (fp32 + fp16 graphs, tokenizer asset, manifest.json);
    ``tokenizer=False`` leaves the asset out (hosts without laion-clap's vocabulary)."""
    from diffgap.core.tokenizer import ClipBPETokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    builders = {
        "clap_text_encoder": (text_io(), lambda fp16: text_model(fp16, seed)),
        "clap_audio_encoder": (audio_io(), lambda fp16: audio_model(fp16, seed)),
        "diffgap_text_to_audio": (sampler_io("text", "audio", sampler_max_batch), lambda fp16: sampler_model("text", "audio", fp16, seed, sampler_max_batch)),
        "diffgap_audio_to_text": (sampler_io("audio", "text", sampler_max_batch), lambda fp16: sampler_model("audio", "text", fp16, seed, sampler_max_batch)),
    }
    models = {}
    for name, (io, build) in builders.items():
        files = {"fp32": f"{name}.onnx", "fp16": f"{name}.fp16.onnx"}
        onnx.save(build(False), str(root / files["fp32"]))
        onnx.save(build(True), str(root / files["fp16"]))
        models[name] = ModelEntry(io=io, files=files, meta={})
    assets = {"tokenizer": ClipBPETokenizer.from_file(None).save(root).name} if tokenizer else {}
    man = Manifest(root=root, preset="runtime-test", embed_dim=E, models=models, checkpoint_sha256="0" * 64,
                   package_version="0.1.0", assets=assets)
    man.save()
    return man


# -- TensorRT stand-ins (no GPU here): the calls diffgap.runtime.trt_session makes, recorded ----------
class FakeTrt:
    """The ``tensorrt`` names :class:`~diffgap.runtime.trt_session.ContextPerBatch` uses."""

    class ExecutionContextAllocationStrategy:
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"


class FakeContext:
    """An execution context that records its calls and, like TensorRT, refuses shapes outside the profile."""

    def __init__(self, engine: "FakeEngine", strategy: str) -> None:
        self.engine, self.strategy = engine, strategy
        self.memory: tuple[int, int] | None = None
        self.addresses: dict[str, int] = {}
        self.profile_calls: list[tuple[int, int]] = []
        self.shape_calls: list[tuple[str, tuple[int, ...]]] = []

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory = (address, size)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile_calls.append((index, stream))
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.io.profile(name)
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shape_calls.append((name, tuple(shape)))
        return True


class FakeAllocation:
    def __init__(self, nbytes: int, address: int) -> None:
        self.nbytes, self.address, self.freed = nbytes, address, 0

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self.freed += 1


class FakeEngine:
    """``device_memory_size_v2`` and ``create_execution_context(strategy)`` of an ICudaEngine."""

    def __init__(self, io: IOSpec, device_memory_size_v2: int = 1 << 20) -> None:
        self.io, self.device_memory_size_v2 = io, device_memory_size_v2
        self.contexts: list[FakeContext] = []
        self.allocations: list[FakeAllocation] = []

    def create_execution_context(self, strategy: str = "STATIC") -> FakeContext:
        ctx = FakeContext(self, strategy)
        self.contexts.append(ctx)
        return ctx

    def alloc(self, nbytes: int) -> FakeAllocation:
        a = FakeAllocation(nbytes, 0x7F00_0000 + 0x1000 * len(self.allocations))
        self.allocations.append(a)
        return a
