"""TensorRT compatibility lint for exported ONNX graphs (no TensorRT needed to run it).

What it checks, node by node, against TensorRT's ONNX parser documentation:

1. **Operator support.** Every op must be marked supported ("Y") in onnx-tensorrt's
   ``docs/operators.md``. :data:`TRT_OPS` below is that table as of **TensorRT 10.15**
   (https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md, "TensorRT 10.15 supports
   operators in the inclusive range of opset 9 to opset 24"), reduced to the supported ops and their
   "Supported Types" column. Ops added after our floor target 10.12 carry the version that added them,
   from onnx-tensorrt's CHANGELOG.md: ``Attention`` (10.14), ``RMSNormalization``,
   ``RotaryEmbedding``, ``TensorScatter`` (10.15). TensorRT 11 keeps the 10.x ONNX parser's op set
   (strongly typed networks only), so a graph that passes for 10.12 is what we ship for both.
2. **No control flow or sequences.** ``Loop``/``If``/``Scan`` are parseable by TensorRT but the fused
   sampler must be a straight-line graph (fixed K, unrolled), so they are errors here; sequence and
   optional ops are unsupported by TensorRT altogether.
3. **Data types.** The dtype of each node's data input (input 0; for ``Where`` the value inputs; for
   ``Cast`` also the output) must be in that op's supported types. This is the "int64 only where
   TensorRT accepts it" rule: TensorRT 10 runs INT64 for shape/index/arithmetic ops listed with INT64
   and nowhere else. DOUBLE is never accepted (TensorRT would clamp it to FLOAT).
4. **Opset.** The default-domain opset must lie in [9, 20]: TensorRT 10.0's operators.md documents
   9..20 and 10.15's documents 9..24; 10.12's own ceiling is not in the docs cited, so the floor
   target is held to the range every 10.x release documents. Custom domains are errors (no plugins).
5. **Documented restrictions** that can be checked statically: ``Reduce*`` axes must be a constant
   (initializer or Constant node), ``Resize`` modes (``cubic`` is a warning: the table lists only
   nearest/linear, while TensorRT's IResizeLayer has had ``InterpolationMode::kCUBIC`` since 8.x --
   confirm on a GPU host with ``diffgap build-engines``), ``TopK`` ``K < 3840`` and ``sorted=1``.

Usage: ``lint_model(path_or_model) -> LintReport``; ``report.ok``, ``report.errors``,
``report.format()``. ``diffgap export`` runs it on every graph it writes and refuses to finish with
errors.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import onnx
from onnx import TensorProto

log = logging.getLogger(__name__)

TARGET_TRT = (10, 12)   # floor target: TensorRT 10.12+ and 11 (strongly typed)
OPSET_RANGE = (9, 20)   # see module docstring, point 4

_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)

# op -> (supported types, TensorRT version that added it). Source: onnx-tensorrt docs/operators.md
# (TensorRT 10.15), rows marked "Y"; versions from onnx-tensorrt CHANGELOG.md for post-10.12 ops.
TRT_OPS: dict[str, tuple[tuple[str, ...], tuple[int, int]]] = {
    **{op: (_FI, (10, 0)) for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual",
        "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Pow", "Range",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "ScatterElements",
        "Scatter", "ScatterND", "Shrink", "Sign", "SpaceToDepth", "Sub", "Sum", "TopK")},
    **{op: (_FIB, (10, 0)) for op in (
        "Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND",
        "Identity", "If", "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice",
        "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where")},
    **{op: (_F, (10, 0)) for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization",
        "Ceil", "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout",
        "Einsum", "Elu", "Erf", "Exp", "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool",
        "GlobalMaxPool", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax",
        "ImageScaler", "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu", "Log",
        "LogSoftmax", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool",
        "MeanVarianceNormalization", "ParametricSoftplus", "PRelu", "QuantizeLinear",
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal",
        "Resize", "RNN", "Round", "ScaledTanh", "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax",
        "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Upsample")},
    "Cast": (_FIB + ("UINT8",), (10, 0)),
    "CastLike": (_FIB + ("UINT8",), (10, 0)),
    "Constant": (_FIB, (10, 0)),
    "ConstantOfShape": (_FIB, (10, 0)),
    "Mean": (_FI, (10, 0)),
    "Gelu": (_FI, (10, 0)),
    "BlackmanWindow": (("FP32", "FP16"), (10, 0)),
    "HammingWindow": (("FP32", "FP16"), (10, 0)),
    "HannWindow": (("FP32", "FP16"), (10, 0)),
    "DeformConv": (("FP32", "FP16"), (10, 0)),
    "GridSample": (("FP32", "FP16"), (10, 0)),
    "Mish": (("FP32", "FP16"), (10, 0)),
    "NonMaxSuppression": (("FP32", "FP16"), (10, 0)),
    "NonZero": (("FP32", "FP16"), (10, 0)),
    "RoiAlign": (("FP32", "FP16"), (10, 0)),
    "STFT": (("FP32",), (10, 0)),
    "DequantizeLinear": (("INT8", "FP8", "FP4", "INT4"), (10, 0)),
    "And": (("BOOL",), (10, 0)),
    "Or": (("BOOL",), (10, 0)),
    "Xor": (("BOOL",), (10, 0)),
    "Not": (("BOOL",), (10, 0)),
    "Attention": (_F, (10, 14)),
    "RMSNormalization": (_F, (10, 15)),
    "RotaryEmbedding": (_F, (10, 15)),
    "TensorScatter": (_F + ("INT32",), (10, 15)),
}

# Parseable by TensorRT, but forbidden in our graphs: the sampler is unrolled straight-line code.
CONTROL_FLOW = ("Loop", "If", "Scan")
_SEQUENCE_PREFIXES = ("Sequence", "Optional")
_SEQUENCE_OPS = ("ConcatFromSequence", "SplitToSequence")

_ELEM = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8", TensorProto.INT8: "INT8", TensorProto.DOUBLE: "DOUBLE",
    TensorProto.INT16: "INT16", TensorProto.UINT16: "UINT16", TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64", TensorProto.STRING: "STRING",
}


@dataclass
class LintReport:
    """Result of :func:`lint_model`: errors block deployment, warnings need a GPU-side check."""

    name: str
    opset: int
    op_counts: dict[str, int]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        lines = [
            f"TensorRT lint {status}: {self.name} (opset {self.opset}, {sum(self.op_counts.values())} nodes, "
            f"{len(self.op_counts)} op types; target TensorRT >= {TARGET_TRT[0]}.{TARGET_TRT[1]})"
        ]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "opset": self.opset, "op_counts": dict(self.op_counts),
                "errors": list(self.errors), "warnings": list(self.warnings)}


def _const_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Nodes of the graph and of any subgraph (so a Loop body's ops are linted too)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


def lint_model(model: onnx.ModelProto | str | Path, target: tuple[int, int] = TARGET_TRT) -> LintReport:
    """Lint one ONNX model (a ModelProto or a path) for TensorRT ``target`` and later."""
    if not isinstance(model, onnx.ModelProto):
        name = Path(model).name
        model = onnx.load(str(model))
    else:
        name = model.graph.name or "model"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:  # noqa: BLE001 - a graph shape inference rejects is itself a finding
        inferred = model
        type_err = f"ONNX shape inference failed ({type(e).__name__}: {e}); dtypes not checked"
    else:
        type_err = None
    g = inferred.graph
    dtypes: dict[str, int] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            dtypes[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        dtypes[init.name] = init.data_type
    for n in g.node:
        if n.op_type == "Constant":
            t = _attr(n, "value")
            if t is not None:
                dtypes[n.output[0]] = t.data_type

    nodes = list(_all_nodes(model.graph))
    counts = collections.Counter(n.op_type for n in nodes)
    rep = LintReport(name=name, opset=opset, op_counts=dict(sorted(counts.items())))
    if type_err:
        rep.errors.append(type_err)

    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        rep.errors.append(
            f"opset {opset} outside [{OPSET_RANGE[0]}, {OPSET_RANGE[1]}] documented for TensorRT 10.x; "
            f"re-export with opset {OPSET_RANGE[0]}..{OPSET_RANGE[1]}"
        )
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            rep.errors.append(f"custom op domain {o.domain!r} would need a TensorRT plugin; export with standard ops only")

    consts = _const_names(model.graph)
    seen_unsupported: set[str] = set()
    dtype_issues: dict[tuple[str, str], int] = collections.Counter()
    for n in nodes:
        op = n.op_type
        label = n.name or op
        if op in CONTROL_FLOW:
            rep.errors.append(f"{op} node {label!r}: control flow is not allowed (the sampler must be unrolled straight-line code)")
            continue
        if op.startswith(_SEQUENCE_PREFIXES) or op in _SEQUENCE_OPS:
            rep.errors.append(f"{op} node {label!r}: sequence/optional ops are not supported by TensorRT")
            continue
        if n.domain not in ("", "ai.onnx"):
            rep.errors.append(f"node {label!r} is {n.domain}::{op}: custom domains need a TensorRT plugin")
            continue
        spec = TRT_OPS.get(op)
        if spec is None:
            if op not in seen_unsupported:
                seen_unsupported.add(op)
                rep.errors.append(f"op {op} ({counts[op]}x) is not in TensorRT's supported ONNX operator list")
            continue
        types, since = spec
        if since > target:
            rep.errors.append(
                f"op {op} needs TensorRT >= {since[0]}.{since[1]} but the target is {target[0]}.{target[1]}"
            )
        # -- dtypes (point 3) --
        checked = [n.input[0]] if n.input and n.input[0] else []
        if op == "Where":
            checked = [x for x in n.input[1:] if x]
        if op in ("Cast", "CastLike", "Constant", "ConstantOfShape", "RandomNormal", "RandomUniform") and n.output:
            checked = checked + [n.output[0]] if op.startswith("Cast") else [n.output[0]]
        for tname in checked:
            et = dtypes.get(tname)
            if et is None:
                continue
            tn = _ELEM.get(et, f"elem_type {et}")
            if tn not in types:
                dtype_issues[(op, tn)] += 1
        # -- documented restrictions (point 5) --
        if op.startswith("Reduce") and len(n.input) > 1 and n.input[1] and n.input[1] not in consts:
            rep.errors.append(f"{op} node {label!r}: axes must be an initializer/constant for TensorRT")
        if op == "Resize":
            mode = _attr(n, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode == "cubic":
                rep.warnings.append(
                    f"Resize node {label!r} uses mode=cubic: operators.md lists nearest/linear only; TensorRT's "
                    "IResizeLayer supports kCUBIC -- confirm with a TensorRT build on a GPU host"
                )
            elif mode not in ("nearest", "linear"):
                rep.errors.append(f"Resize node {label!r}: mode {mode!r} unsupported by TensorRT")
            if _attr(n, "antialias", 0):
                rep.errors.append(f"Resize node {label!r}: antialias is not supported by TensorRT")
        if op == "TopK" and _attr(n, "sorted", 1) != 1:
            rep.errors.append(f"TopK node {label!r}: TensorRT needs sorted=1")
    for (op, tn), k in sorted(dtype_issues.items()):
        rep.errors.append(
            f"{k} {op} node(s) compute in {tn}, which TensorRT's {op} does not accept "
            f"(supported: {', '.join(TRT_OPS[op][0])})"
        )
    for vi in (*model.graph.input, *model.graph.output):
        et = vi.type.tensor_type.elem_type
        if _ELEM.get(et) in ("DOUBLE", "STRING", None) or _ELEM.get(et, "").startswith("UINT1"):
            rep.errors.append(f"graph I/O {vi.name!r} has type {_ELEM.get(et, et)}, not a TensorRT I/O type")
    return rep
