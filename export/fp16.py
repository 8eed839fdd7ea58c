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

Conversion time: stock AutoCast (nvidia-modelopt 0.47) is quadratic on the fused samplers (K
unrolled DDIM steps, each with a conditional and an unconditional denoiser call; measured before the
two calls became one stacked pass). For one clap-512 direction with the guidance input, 2 CPU cores: K = 4 ~20 s, K = 10 ~53 s, K = 25 ~268 s, K = 50
~18 min. cProfile of K = 10 / 25 shows three causes, all in AutoCast's bookkeeping, none in its
precision decisions:

1. ``PrecisionConverter._cleanup_no_consumer_nodes`` and ``remove_redundant_casts`` (via
   ``_bypass_cast_node``/``_is_sequential_cast``) call ``modelopt.onnx.utils.get_consumer_nodes`` /
   ``get_producer_nodes``, which scan the whole node list, once per node or Cast (~55% of K = 10).
2. ``PrecisionConverter._add_cast`` finds the producer's position by a Python scan with protobuf
   equality, once per inserted Cast.
3. ``GraphSanitizer.duplicate_shared_constants`` gives every use of a shared initializer its own
   copy. The denoiser's weights are used at every unrolled step, so the graph grows with K (a
   16 MB FP32 graph became a 127 MB FP16 file at K = 10, 315 MB at K = 25) and every whole-model
   pass after it (ByteSize, checker, shape inference, serialisation) pays for the copies.

:func:`_linear_time_autocast` replaces exactly these pieces for the duration of one conversion:
(1) the same passes with a tensor -> node index kept exact across the Cast bypasses; (2) Casts first
inserted without the scan, then placed in one pass right after their producers, where stock AutoCast
puts them; (3) shared initializers stay shared (AutoCast's own initializer pass already adds a copy
of the other precision when a weight's consumers differ in precision). With (1) and (2) alone the
K = 10 output is byte-identical to stock AutoCast's; with (3) it has the same nodes with the same
precisions (tests/test_export_fp16.py compares against stock AutoCast) and stores each weight once
(8.5 MB instead of 127 MB at K = 10). Time after, clap-512 with guidance, 2 shared CPU cores:
K = 4 / 10 / 25 / 50 (547 / 1,315 / 3,235 / 6,435 nodes): 2.3 / 3.2 / 7.7 / 20.6 s. What is left
above linear is stock ``remove_redundant_casts`` deleting each redundant Cast with a list scan
(~6 s of the K = 50 time). The replaced functions are checked to exist with the expected
parameters; if a ModelOpt upgrade changes them, the conversion runs stock AutoCast (same graph,
quadratic time) and says so in a warning.

AutoCast's reference pass runs on the IOSpec's sample inputs (written to a temporary ``.npz``), not
on its default uniform(-1, 1) data, so the range rule sees the declared input distributions.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

from diffgap.core.iospec import IOSpec, onnx_elem_type

from .onnx_export import check_and_infer, read_metadata, save_model, set_metadata

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
    kept FP32), ``"cavp_audio_encoder"`` (CAVP's mel front end and input BatchNorm kept FP32),
    ``"text_encoder"`` or ``"video_encoder"`` (only the op-type rules). Returns the saved ModelProto. Graph I/O types are checked to
    be exactly the IOSpec's.
    """
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
        np.savez(calib, **io_spec.sample_inputs(CALIBRATION_BATCH, seed=1))
        with _linear_time_autocast():
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
        "diffgap.precision": "fp16",
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
    passes (:func:`_linear_time_autocast`) as much as AutoCast itself.
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


class _NodeIndex:
    """Positions of each tensor's consumer and producer nodes, for a graph whose node list keeps its order."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.consumers: dict[str, set[int]] = defaultdict(set)
        self.producers: dict[str, set[int]] = defaultdict(set)
        for i, n in enumerate(graph.node):
            for t in n.input:
                self.consumers[t].add(i)
            for t in n.output:
                self.producers[t].add(i)

    def nodes(self, table: dict[str, set[int]], tensor: str) -> list[onnx.NodeProto]:
        # graph order, as modelopt.onnx.utils.get_consumer_nodes / get_producer_nodes return them
        return [self.graph.node[i] for i in sorted(table.get(tensor, ()))]

    def refresh(self, tensors: Iterable[str], positions: Iterable[int]) -> None:
        """Re-read ``tensors``' entries from the nodes at ``positions`` (the only nodes that changed)."""
        positions = tuple(positions)
        for t in tensors:
            for table, field in ((self.consumers, "input"), (self.producers, "output")):
                entry = table[t]
                for i in positions:
                    if t in getattr(self.graph.node[i], field):
                        entry.add(i)
                    else:
                        entry.discard(i)


@contextlib.contextmanager
def _linear_time_autocast():
    """Swap AutoCast's three quadratic pieces for linear-time ones during one conversion (module docstring).

    Written against nvidia-modelopt 0.47's internals: it checks that every replaced function exists
    with the expected parameters and otherwise leaves AutoCast untouched (same graph, slow).
    """
    from modelopt.onnx import utils as ou
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    targets = {
        (ou, "remove_redundant_casts"): ("onnx_model",),
        (ou, "get_consumer_nodes"): ("model", "tensor_name"),
        (ou, "get_producer_nodes"): ("model", "tensor_name"),
        (ou, "_bypass_cast_node"): ("model", "node"),
        (PrecisionConverter, "_cleanup_no_consumer_nodes"): ("self",),
        (PrecisionConverter, "_add_cast"): ("self", "tensor_name", "cast_to", "exclude_consumers",
                                           "tensor_to_consumers", "tensor_to_producers"),
        (PrecisionConverter, "_convert_initializers_recursive"): ("self", "low_precision_nodes", "high_precision_nodes"),
        (GraphSanitizer, "duplicate_shared_constants"): ("self",),
    }
    stock = {}
    for (owner, attr), params in targets.items():
        fn = getattr(owner, attr, None)
        if fn is None or tuple(inspect.signature(fn).parameters) != params:
            log.warning("ModelOpt AutoCast's internals differ from 0.47's (%s.%s); converting with stock AutoCast, "
                        "whose time grows with the square of the node count (minutes for K >= 25 samplers)",
                        getattr(owner, "__name__", owner), attr)
            yield
            return
        stock[(owner, attr)] = fn

    def remove_redundant_casts(onnx_model):
        # Stock pass, with its consumer/producer look-ups served by an index. The pass only rewires
        # tensor names around each bypassed Cast and removes the Casts at the end, so re-reading the
        # bypassed tensors' entries from the nodes that touched them keeps the index exact.
        idx = _NodeIndex(onnx_model.graph)
        bypass = stock[(ou, "_bypass_cast_node")]

        def indexed_bypass(model, node):
            tin, tout = node.input[0], node.output[0]
            touched = set().union(*(table.get(t, ()) for table in (idx.consumers, idx.producers) for t in (tin, tout)))
            bypass(model, node)
            idx.refresh((tin, tout), touched)

        ou.get_consumer_nodes = lambda model, tensor_name: idx.nodes(idx.consumers, tensor_name)
        ou.get_producer_nodes = lambda model, tensor_name: idx.nodes(idx.producers, tensor_name)
        ou._bypass_cast_node = indexed_bypass
        try:
            return stock[(ou, "remove_redundant_casts")](onnx_model)
        finally:
            for attr in ("get_consumer_nodes", "get_producer_nodes", "_bypass_cast_node"):
                setattr(ou, attr, stock[(ou, attr)])

    def cleanup_no_consumer_nodes(self):
        # Same rule as stock: drop every node none of whose outputs is read or is a graph output.
        g = self.model.graph
        live = {o.name for o in g.output} | {t for n in g.node for t in n.input}
        for i in reversed([i for i, n in enumerate(g.node) if not any(o in live for o in n.output)]):
            if g.node[i].op_type != "Cast":
                log.debug("AutoCast clean-up: removing non-Cast node with no consumers %s", g.node[i].name)
            del g.node[i]

    def add_cast(self, tensor_name, cast_to, exclude_consumers=(), tensor_to_consumers=None, tensor_to_producers=None):
        if tensor_to_producers is None:  # a call outside convert()'s cast insertion: untouched
            return stock[(PrecisionConverter, "_add_cast")](
                self, tensor_name, cast_to, exclude_consumers, tensor_to_consumers, tensor_to_producers)
        # No producer given -> stock inserts the Cast at position 0 without scanning; remember where it
        # belongs (right after its producer, where stock would put it) for the reorder below.
        pending = self.__dict__.setdefault("_diffgap_pending_casts", [])
        n0 = len(self.model.graph.node)
        stock[(PrecisionConverter, "_add_cast")](
            self, tensor_name, cast_to, frozenset(exclude_consumers), tensor_to_consumers, {})
        if len(self.model.graph.node) != n0:
            producers = tensor_to_producers.get(tensor_name, [])
            pending.append(producers[0].name if producers else None)

    def convert_initializers_recursive(self, low_precision_nodes, high_precision_nodes):
        # Runs right after convert()'s last _add_cast: put the Casts (now at the front, newest first)
        # back in stock order -- graph-input Casts first, every other one right after its producer,
        # newest first -- so the graph is topologically sorted again for type inference.
        pending = self.__dict__.pop("_diffgap_pending_casts", [])
        if pending:
            g = self.model.graph
            nodes = list(g.node)
            after: dict[str | None, list[onnx.NodeProto]] = defaultdict(list)
            for cast, producer in zip(nodes[: len(pending)], reversed(pending)):
                after[producer].append(cast)
            order = after.pop(None, [])
            for n in nodes[len(pending):]:
                order.append(n)
                order.extend(after.pop(n.name, ()))
            if after or len(order) != len(nodes) or any(n.op_type != "Cast" for n in nodes[: len(pending)]):
                raise RuntimeError(f"AutoCast cast placement: producers {sorted(map(str, after))[:3]} not found")
            copies = []
            for n in order:
                c = onnx.NodeProto()
                c.CopyFrom(n)
                copies.append(c)
            del g.node[:]
            g.node.extend(copies)
        return stock[(PrecisionConverter, "_convert_initializers_recursive")](self, low_precision_nodes, high_precision_nodes)

    ou.remove_redundant_casts = remove_redundant_casts
    PrecisionConverter._cleanup_no_consumer_nodes = cleanup_no_consumer_nodes
    PrecisionConverter._add_cast = add_cast
    PrecisionConverter._convert_initializers_recursive = convert_initializers_recursive
    GraphSanitizer.duplicate_shared_constants = lambda self: None  # keep shared weights shared (module docstring)
    try:
        yield
    finally:
        for (owner, attr), fn in stock.items():
            setattr(owner, attr, fn)
