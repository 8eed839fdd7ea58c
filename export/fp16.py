"""FP16 graphs for TensorRT 10.12+/11: strongly typed mixed precision made with ModelOpt AutoCast.

Why AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``): TensorRT 11 has no
``BuilderFlag.FP16`` -- an engine's precision is whatever the ONNX graph's types say (strong typing),
and AutoCast is NVIDIA's tool for writing exactly such graphs. It installs and runs on CPU here
(its reference pass uses ONNX Runtime's CPU provider), keeps nodes whose reference activations or
initializers exceed FP16's safe range in FP32 by itself, and inserts the Casts so that every
tensor's type is explicit. onnxconverter-common (the alternative) needs a hand-written block list
and needs the same care on the timestep embedding (blocking Sin/Cos alone does not help: the
rounding happens in the Mul before them, see below).

What stays FP32, and why:

* **Graph I/O** (``keep_io_types=True``): the IOSpec declares FP32 (and int64 ids) for every
  backend; the FP16 graph is a drop-in replacement.
* **The sinusoidal timestep embedding** of the denoisers: every ancestor of a ``Sin``/``Cos`` node
  (the ``t * freq`` Mul, the frequency Exp, Casts/Unsqueezes) via ``nodes_to_exclude``. FP16's
  spacing between 512 and 1024 is 0.5, so in FP16 the Mul rounds ``t * freq`` at t ~ 1000 by up to
  0.25 rad before Sin/Cos see it: a phase error no later FP32 node can undo, so excluding Sin/Cos
  alone does not help.
  In the fused samplers the timesteps are constants, so the exporter's constant folding already
  computes the whole embedding (and its MLP) in FP32 at export time and no Sin/Cos remain; the rule
  matters for graphs with a dynamic timestep and is tested on one (tests/test_export_pipeline.py).
* **Normalisations, reductions, exp/log/pow/sqrt** (``op_types_to_exclude``, :data:`FP32_OP_TYPES`):
  LayerNorm/Softmax/L2 statistics sum hundreds of squares or exponentials (overflow above 65504,
  underflow of small variances); TensorRT runs them in FP32 at negligible cost.
* **The audio encoder's mel front end** (STFT convolutions, power, mel matmul, log, ``bn0``), by
  node-name scope: a 10 s waveform's power spectrum spans far more than FP16's dynamic range.
  AutoCast's own range rule keeps most of it anyway (on the HTSAT tower it kept the mel
  power/matmul/clamp by itself); the explicit rule makes it certain.

Conversion time: stock AutoCast is quadratic in the node count on the fused samplers;
:mod:`diffgap.export.modelopt_autocast_patch` replaces its three quadratic bookkeeping passes for
the duration of one conversion (same per-node precisions, time about linear in the node count).

Calibration: AutoCast's range rule keeps a node in FP32 when its activations on a reference pass
leave FP16's safe range, so the reference inputs decide what stays FP32. ``convert_fp16`` takes them
explicitly (``calibration``, written to a temporary ``.npz``) instead of AutoCast's uniform(-1, 1)
default or the IOSpec's clipped N(0, 1) samples (half the guidance scales 0, waveforms clipped noise,
frames half black); :mod:`diffgap.export.calibration` makes inputs a user sends: tokenised captions,
tones/sweeps/noise bursts at speech-to-music loudness, textured moving frames, encoder embeddings as
conditions and the exported default guidance scale.
"""
from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from diffgap.core.iospec import IOSpec, onnx_elem_type

from .modelopt_autocast_patch import linear_time_autocast
from .onnx_export import META_GRAPH_PRECISION, check_and_infer, read_metadata, save_model, set_metadata

log = logging.getLogger(__name__)

FP32_OP_TYPES: tuple[str, ...] = (
    "LayerNormalization", "BatchNormalization", "Softmax", "LogSoftmax",
    "ReduceL2", "ReduceSumSquare", "ReduceMean", "ReduceSum", "ReduceLogSumExp",
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Sin", "Cos", "Erf",
)
# Scopes (TorchScript exporter node names follow the module path) of laion-clap's audio front end.
AUDIO_FRONT_END_SCOPES: tuple[str, ...] = ("spectrogram_extractor", "logmel_extractor", "bn0")
# ... and of the CAVP audio tower (diffgap.encoders.cavp): the log-mel front end ``mel`` (DFT conv,
# magnitude, mel matmul, log10, clip) and Cnn14's input BatchNorm ``bn`` (exported as
# ``/mel/...`` and ``/spec_encoder/bn/...``), for the same dynamic-range reason.
CAVP_AUDIO_FRONT_END_SCOPES: tuple[str, ...] = ("mel", "bn")
# graph kind -> front-end scopes kept FP32 (must match at least one node)
FRONT_END_SCOPES: dict[str, tuple[str, ...]] = {
    "audio_encoder": AUDIO_FRONT_END_SCOPES,
    "cavp_audio_encoder": CAVP_AUDIO_FRONT_END_SCOPES,
}


def name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (exclusion rules and reports address nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def timestep_embedding_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of every ``Sin``/``Cos`` node and all of their ancestors (the timestep-embedding branch).

    The walk stops at ``Shape``/``Size`` nodes: a timestep broadcast to the batch reads only the
    *shape* of x_t, and following it would pin every earlier sampler step.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    stack = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    found: dict[str, onnx.NodeProto] = {}
    while stack:
        n = stack.pop()
        if n.name in found:
            continue
        found[n.name] = n
        if n.op_type in ("Shape", "Size"):
            continue  # a shape-only dependency (e.g. torch.full((B,), t)) is not part of the branch
        stack.extend(producer[i] for i in n.input if i in producer)
    return sorted(found)


def scope_nodes(model: onnx.ModelProto, scopes: Iterable[str]) -> list[str]:
    scopes = tuple(scopes)
    return sorted(n.name for n in model.graph.node if any(f"/{s}/" in n.name or n.name.startswith(f"{s}/") for s in scopes))


def convert_fp16(
    src: str | Path,
    dst: str | Path,
    io_spec: IOSpec,
    *,
    kind: str,
    calibration: Mapping[str, np.ndarray],
    extra_exclude_nodes: Sequence[str] = (),
    op_types_to_exclude: Sequence[str] = FP32_OP_TYPES,
    linear_time: bool = True,
) -> onnx.ModelProto:
    """Write the FP16 (mixed-precision, strongly typed) version of the FP32 graph ``src`` to ``dst``.

    ``kind``: ``"denoiser"`` (timestep embedding kept FP32), ``"audio_encoder"`` (mel front end
    kept FP32), ``"cavp_audio_encoder"`` (CAVP's mel front end and input BatchNorm kept FP32),
    ``"text_encoder"`` or ``"video_encoder"`` (only the op-type rules). ``calibration``: the feeds of
    AutoCast's reference pass, one array per declared input (:mod:`diffgap.export.calibration`).
    ``linear_time``: convert under :func:`~diffgap.export.modelopt_autocast_patch.linear_time_autocast`
    (False: stock AutoCast, quadratic time). Returns the saved ModelProto. Graph I/O types are checked
    to be exactly the IOSpec's.
    """
    io_spec.check_feeds(calibration)
    if kind not in ("denoiser", "audio_encoder", "text_encoder", "cavp_audio_encoder", "video_encoder"):
        raise ValueError(f"unknown graph kind {kind!r}; use denoiser, audio_encoder, text_encoder, "
                         "cavp_audio_encoder or video_encoder")
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.autocast.logging_config import configure_logging

    # AutoCast logs every node it keeps in FP32 at INFO; surface that only with --verbose.
    configure_logging(logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING)

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    meta = read_metadata(model)
    name_unnamed_nodes(model)
    exclude: list[str] = list(extra_exclude_nodes)
    if kind == "denoiser":
        ts_nodes = timestep_embedding_nodes(model)
        if not ts_nodes:
            log.info("%s: no Sin/Cos nodes (timestep embedding folded to constants); nothing to pin", io_spec.name)
        exclude += ts_nodes
    elif kind in FRONT_END_SCOPES:
        front = scope_nodes(model, FRONT_END_SCOPES[kind])
        if not front:
            raise ValueError(f"{io_spec.name}: found no mel front-end nodes ({FRONT_END_SCOPES[kind]}) to keep in FP32")
        exclude += front

    with tempfile.TemporaryDirectory(prefix="diffgap-fp16-") as td:
        named = Path(td) / "named.onnx"
        onnx.save_model(model, str(named))
        calib = Path(td) / "calib.npz"
        np.savez(calib, **calibration)
        with linear_time_autocast() if linear_time else contextlib.nullcontext():
            out = convert_to_mixed_precision(
                onnx_path=str(named),
                low_precision_type="fp16",
                keep_io_types=True,
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude] or None,
                op_types_to_exclude=list(op_types_to_exclude) or None,
                calibration_data=str(calib),
                providers=["cpu"],
            )
    for vi, spec in zip([*out.graph.input, *out.graph.output], [*io_spec.inputs, *io_spec.outputs]):
        if vi.name != spec.name or vi.type.tensor_type.elem_type != onnx_elem_type(spec.dtype):
            raise RuntimeError(f"{io_spec.name}: FP16 conversion changed graph I/O {vi.name!r}; expected {spec.name} {spec.dtype}")
    _check_casts(out, io_spec.name)
    fp16_inits = {i.name for i in out.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    fp16_nodes = sum(
        1 for n in out.graph.node
        if n.op_type in ("MatMul", "Gemm", "Conv") and any(x in fp16_inits for x in n.input)
    )
    del out.metadata_props[:]
    set_metadata(out, {
        **meta,
        META_GRAPH_PRECISION: "fp16",
        "diffgap.fp16_tool": _autocast_version(),
        "diffgap.fp16_fp32_pinned_nodes": str(len(exclude)),
        "diffgap.fp16_fp32_op_types": ",".join(op_types_to_exclude),
    })
    check_and_infer(out)
    save_model(out, dst)
    log.info("fp16 %s -> %s (%d pinned nodes, %d fp16 matmul/gemm/conv)", io_spec.name, dst, len(exclude), fp16_nodes)
    return out


def _autocast_version() -> str:
    try:
        from importlib.metadata import version

        return f"nvidia-modelopt {version('nvidia-modelopt')} AutoCast"
    except Exception:  # noqa: BLE001 - version lookup is informational only
        return "nvidia-modelopt AutoCast"


_WIDTH = {onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.FLOAT: 32, onnx.TensorProto.DOUBLE: 64}


def _check_casts(model: onnx.ModelProto, name: str) -> None:
    """Raise if the converted graph has dead-end, same-type or lossless round-trip Casts.

    AutoCast's clean-up passes should leave none; this guards the linear-time replacements of those
    passes (:func:`~diffgap.export.modelopt_autocast_patch.linear_time_autocast`) as much as AutoCast itself.
    """
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for t in n.input:
            consumers[t].append(n)
    outputs = {o.name for o in g.output}
    dead = [n.name for n in g.node if n.op_type == "Cast" and n.output[0] not in outputs and n.output[0] not in consumers]
    if dead:
        raise RuntimeError(f"{name}: FP16 conversion left {len(dead)} Casts whose outputs nothing reads, e.g. {dead[:3]}")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.graph.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type != "Cast":
            continue
        to = next(a.i for a in n.attribute if a.name == "to")
        src = types.get(n.input[0])
        if src == to:
            raise RuntimeError(f"{name}: FP16 conversion left a same-type Cast {n.name!r}")
        nxt = consumers.get(n.output[0], [])
        if (n.output[0] not in outputs and len(nxt) == 1 and nxt[0].op_type == "Cast" and src in _WIDTH and to in _WIDTH
                and _WIDTH[to] > _WIDTH[src] and next(a.i for a in nxt[0].attribute if a.name == "to") == src):
            raise RuntimeError(f"{name}: FP16 conversion left a no-op Cast round trip {n.name!r} -> {nxt[0].name!r}")
