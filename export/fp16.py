"""FP16 graphs for TensorRT 10.12+/11: strongly typed mixed precision made with ModelOpt AutoCast.

Why AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``): TensorRT 11 has no
``BuilderFlag.FP16`` -- an engine's precision is whatever the ONNX graph's types say (strong typing),
and AutoCast is NVIDIA's tool for writing exactly such graphs. It installs and runs on CPU here
(its reference pass uses ONNX Runtime's CPU provider), keeps nodes whose reference activations or
initializers exceed FP16's safe range in FP32 by itself, and inserts the Casts so that every
tensor's type is explicit. onnxconverter-common (the alternative) needs a hand-written block list
and behaves the same on the timestep embedding (see /work/shared/FP16.md).

What stays FP32, and why:

* **Graph I/O** (``keep_io_types=True``): the IOSpec declares FP32 (and int64 ids) for every
  backend; the FP16 graph is a drop-in replacement.
* **The sinusoidal timestep embedding** of the denoisers: every ancestor of a ``Sin``/``Cos`` node
  (the ``t * freq`` Mul, the frequency Exp, Casts/Unsqueezes) via ``nodes_to_exclude``. In FP16 the
  Mul rounds ``t * freq`` at t ~ 1000 to +-0.5 rad, which costs ~20x more error than the rest of the
  net (FP16.md: max abs 1-2e-2 vs 7e-4 with the exclusion); excluding Sin/Cos alone does not help.
  In the fused samplers the timesteps are constants, so the exporter's constant folding already
  computes the whole embedding (and its MLP) in FP32 at export time and no Sin/Cos remain; the rule
  matters for graphs with a dynamic timestep and is tested on one (tests/test_export_pipeline.py).
* **Normalisations, reductions, exp/log/pow/sqrt** (``op_types_to_exclude``, :data:`FP32_OP_TYPES`):
  LayerNorm/Softmax/L2 statistics sum hundreds of squares or exponentials (overflow above 65504,
  underflow of small variances); TensorRT runs them in FP32 at negligible cost.
* **The audio encoder's mel front end** (STFT convolutions, power, mel matmul, log, ``bn0``), by
  node-name scope: a 10 s waveform's power spectrum spans far more than FP16's dynamic range.
  AutoCast's own range rule keeps most of it anyway (FP16.md); the explicit rule makes it certain.

Cost: AutoCast's graph passes look up producers/consumers by scanning the node list
(``modelopt.onnx.utils.get_consumer_nodes``), so conversion time grows with the square of the node
count. Measured for one clap-512 sampler direction with the guidance input, 2 CPU cores:
K = 4: 537 nodes, ~20 s; K = 10: 1,293 nodes, 53 s; K = 25: 3,183 nodes, 268 s; K = 50: 6,333 nodes,
~18 min (extrapolated; stopped after 13). The FP32 export's simplification (onnxslim) already
halves the node count; evaluating the conditional and unconditional branches in one batched
denoiser call inside ``DiffGAP.bridge`` would halve it again (~4x faster conversion).

AutoCast's reference pass runs on the IOSpec's sample inputs (written to a temporary ``.npz``), not
on its default uniform(-1, 1) data, so the range rule sees the declared input distributions.
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

from diffgap.iospec import IOSpec, onnx_elem_type

from .onnx_export import check_and_infer, read_metadata, save_model, set_metadata

log = logging.getLogger(__name__)

FP32_OP_TYPES: tuple[str, ...] = (
    "LayerNormalization", "BatchNormalization", "Softmax", "LogSoftmax",
    "ReduceL2", "ReduceSumSquare", "ReduceMean", "ReduceSum", "ReduceLogSumExp",
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Sin", "Cos", "Erf",
)
# Scopes (TorchScript exporter node names follow the module path) of laion-clap's audio front end.
AUDIO_FRONT_END_SCOPES: tuple[str, ...] = ("spectrogram_extractor", "logmel_extractor", "bn0")
CALIBRATION_BATCH = 4


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
    extra_exclude_nodes: Sequence[str] = (),
    op_types_to_exclude: Sequence[str] = FP32_OP_TYPES,
) -> onnx.ModelProto:
    """Write the FP16 (mixed-precision, strongly typed) version of the FP32 graph ``src`` to ``dst``.

    ``kind``: ``"denoiser"`` (timestep embedding kept FP32), ``"audio_encoder"`` (mel front end
    kept FP32) or ``"text_encoder"``. Returns the saved ModelProto. Graph I/O types are checked to
    be exactly the IOSpec's.
    """
    if kind not in ("denoiser", "audio_encoder", "text_encoder"):
        raise ValueError(f"unknown graph kind {kind!r}; use denoiser, audio_encoder or text_encoder")
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
    elif kind == "audio_encoder":
        front = scope_nodes(model, AUDIO_FRONT_END_SCOPES)
        if not front:
            raise ValueError(f"{io_spec.name}: found no mel front-end nodes ({AUDIO_FRONT_END_SCOPES}) to keep in FP32")
        exclude += front

    if len(model.graph.node) > 2500:
        log.warning("%s: %d nodes -- ModelOpt AutoCast's time grows with the square of the node count "
                    "(~4.5 min at 3,200 nodes on 2 CPU cores); a lower --steps converts much faster",
                    io_spec.name, len(model.graph.node))
    with tempfile.TemporaryDirectory(prefix="diffgap-fp16-") as td:
        named = Path(td) / "named.onnx"
        onnx.save_model(model, str(named))
        calib = Path(td) / "calib.npz"
        np.savez(calib, **io_spec.sample_inputs(CALIBRATION_BATCH, seed=1))
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
    fp16_nodes = sum(
        1 for n in out.graph.node
        if n.op_type in ("MatMul", "Gemm", "Conv") and _is_fp16_node(out, n)
    )
    del out.metadata_props[:]
    set_metadata(out, {
        **meta,
        "diffgap.precision": "fp16",
        "diffgap.fp16_tool": _autocast_version(),
        "diffgap.fp16_fp32_pinned_nodes": str(len(exclude)),
        "diffgap.fp16_fp32_op_types": ",".join(op_types_to_exclude),
    })
    check_and_infer(out)
    save_model(out, dst)
    log.info("fp16 %s -> %s (%d pinned nodes, %d fp16 matmul/gemm/conv)", io_spec.name, dst, len(exclude), fp16_nodes)
    return out


def _is_fp16_node(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return any(inits.get(x) == onnx.TensorProto.FLOAT16 for x in node.input)


def _autocast_version() -> str:
    try:
        from importlib.metadata import version

        return f"nvidia-modelopt {version('nvidia-modelopt')} AutoCast"
    except Exception:  # noqa: BLE001 - version lookup is informational only
        return "nvidia-modelopt AutoCast"
