"""TensorRT compatibility lint for exported ONNX graphs (no TensorRT needed to run it).

What it checks, node by node:

1. **Operator support.** Every op must be marked supported ("Y") in the operator table of TensorRT's
   ONNX parser: onnx-tensorrt's ``docs/operators.md``, shipped verbatim next to this module
   (:data:`OPERATORS_DOC`) and parsed at first use (:func:`documented_table`), never retyped. The copy
   is the file at onnx-tensorrt's tag ``release/10.1-GA`` (:data:`OPERATORS_DOC_SOURCE`), whose header
   documents TensorRT 10.0 (:data:`OPERATORS_DOC_TRT`; a test holds the two together). 10.0 is older
   than the floor target 10.12, so an op it documents is one every target release parses; ops added
   since (``Attention`` in 10.14, for one) are refused, as they must be for a 10.12 target. To move
   the table on, replace the file with a newer release's ``docs/operators.md`` and its version.
   Where TensorRT itself is installed and can create a builder (a GPU host), the installed parser is
   asked too (``IParser::supportsOperator``), and an op it refuses is an error as well.
2. **No control flow or sequences.** ``Loop``/``If``/``Scan`` are parseable by TensorRT but the fused
   sampler must be a straight-line graph (fixed K, unrolled), so they are errors here; sequence and
   optional ops are unsupported by TensorRT altogether.
3. **Data types.** The dtype of each node's data input (input 0; for ``Where`` the value inputs; for
   ``Cast`` also the output) must be in that op's "Supported Types". This is the "int64 only where
   TensorRT accepts it" rule: TensorRT 10 runs INT64 for shape/index/arithmetic ops listed with INT64
   and nowhere else. DOUBLE is never accepted (TensorRT would clamp it to FLOAT).
4. **Opset.** The default-domain opset must lie in the table's documented range (opset 9 to 20 for
   TensorRT 10.0, which every later 10.x range includes). Custom domains are errors (no plugins).
5. **Documented restrictions** that can be checked statically: ``Reduce*`` axes must be a constant
   (initializer or Constant node), ``Resize`` modes (``cubic`` is a warning: the table lists only
   nearest/linear, while TensorRT's IResizeLayer has had ``InterpolationMode::kCUBIC`` since 8.x --
   confirm on a GPU host with ``diffgap build-engines``), ``TopK`` ``sorted=1``.

Usage: ``lint_model(path_or_model) -> LintReport``; ``report.ok``, ``report.errors``,
``report.format()``. ``diffgap export`` runs it on every graph it writes and refuses to finish with
errors.
"""
from __future__ import annotations

import collections
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import onnx
from onnx import TensorProto

log = logging.getLogger(__name__)

TARGET_TRT = (10, 12)   # floor target: TensorRT 10.12+ and 11 (strongly typed)

OPERATORS_DOC = Path(__file__).with_name("tensorrt_onnx_operators_10.0.md")
OPERATORS_DOC_SOURCE = (
    "https://github.com/onnx/onnx-tensorrt/blob/release/10.1-GA/docs/operators.md "
    "(commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c)"
)
OPERATORS_DOC_TRT = (10, 0)   # the release the file's own header documents
# Misprints in the shipped file, read as meant: its ConstantOfShape row lists "INF64".
_TYPE_ERRATA = {"INF64": "INT64"}
_DOC_HEADER = re.compile(r"TensorRT (\d+)\.(\d+) supports operators in the inclusive range of opset (\d+) to opset (\d+)")


@dataclass(frozen=True)
class OperatorTable:
    """TensorRT's ONNX operator table as one release documents it."""

    trt_version: tuple[int, int]
    opset_range: tuple[int, int]
    types: dict[str, tuple[str, ...]]   # supported op -> its "Supported Types"
    unsupported: frozenset[str]          # ops the table lists as "N"

    @property
    def label(self) -> str:
        return f"TensorRT {self.trt_version[0]}.{self.trt_version[1]} operators.md"


def parse_operators_md(text: str) -> OperatorTable:
    """onnx-tensorrt's ``docs/operators.md`` -> :class:`OperatorTable` (header version + support matrix)."""
    m = _DOC_HEADER.search(text)
    if m is None:
        raise ValueError("operators.md has no 'TensorRT X.Y supports operators in the inclusive range of opset A to opset B' line")
    major, minor, lo, hi = (int(g) for g in m.groups())
    types: dict[str, tuple[str, ...]] = {}
    unsupported: set[str] = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or cells[1] not in ("Y", "N"):
            continue  # prose, the header row, the |---| rule
        op, supported = cells[0], cells[1]
        if supported == "N":
            unsupported.add(op)
        else:
            listed = [t.strip() for t in cells[2].split(",")] if len(cells) > 2 else []
            types[op] = tuple(_TYPE_ERRATA.get(t, t) for t in listed if t)
    return OperatorTable((major, minor), (lo, hi), types, frozenset(unsupported))


@functools.cache
def documented_table() -> OperatorTable:
    """The shipped table (:data:`OPERATORS_DOC`), parsed once."""
    return parse_operators_md(OPERATORS_DOC.read_text(encoding="utf-8"))


@functools.cache
def _installed_parser() -> tuple[str, object, tuple] | None:
    """``(version, OnnxParser, objects it needs alive)`` of the installed TensorRT, or None where it is
    not installed, older than the floor, or cannot create a builder here (no usable GPU)."""
    try:
        from diffgap.runtime.trt_host import import_tensorrt, network_flags, trt_logger

        trt = import_tensorrt()
    except (ImportError, RuntimeError) as e:  # not installed / older than the floor target
        log.debug("no TensorRT parser to ask (%s); the documented table alone is used", e)
        return None
    try:
        builder = trt.Builder(trt_logger())
    except (TypeError, RuntimeError) as e:  # pybind11's "factory function returned nullptr"
        builder, reason = None, e
    else:
        reason = "no builder"
    if builder is None:
        log.info("TensorRT %s cannot create a builder here (%s); the documented table alone is used", trt.__version__, reason)
        return None
    network = builder.create_network(network_flags(trt))
    return trt.__version__, trt.OnnxParser(network, trt_logger()), (builder, network)


def tensorrt_parser_support(ops: Iterable[str]) -> tuple[str, dict[str, bool]] | None:
    """Ask the installed TensorRT's ONNX parser which of ``ops`` it supports (``supports_operator``):
    ``(version, {op: bool})``, or None where there is no parser to ask (see :func:`_installed_parser`)."""
    installed = _installed_parser()
    if installed is None:
        return None
    version, parser, _ = installed
    return version, {op: bool(parser.supports_operator(op)) for op in ops}


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
    checked_against: list[str] = field(default_factory=list)   # the op tables / parsers consulted

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        lines = [
            f"TensorRT lint {status}: {self.name} (opset {self.opset}, {sum(self.op_counts.values())} nodes, "
            f"{len(self.op_counts)} op types; target TensorRT >= {TARGET_TRT[0]}.{TARGET_TRT[1]}; "
            f"checked against {', '.join(self.checked_against) or 'nothing'})"
        ]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "opset": self.opset, "op_counts": dict(self.op_counts),
                "errors": list(self.errors), "warnings": list(self.warnings), "checked_against": list(self.checked_against)}


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


def _load(model: onnx.ModelProto | str | Path) -> tuple[str, onnx.ModelProto]:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "model", model
    return Path(model).name, onnx.load(str(model))


def _tensor_dtypes(model: onnx.ModelProto) -> tuple[dict[str, int], str | None]:
    """Element type of every tensor ONNX shape inference can type: ``({name: TensorProto type}, error)``."""
    try:
        g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception as e:  # noqa: BLE001 - a graph shape inference rejects is itself a finding
        g, err = model.graph, f"ONNX shape inference failed ({type(e).__name__}: {e}); dtypes not checked"
    else:
        err = None
    dtypes = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)
              if vi.type.HasField("tensor_type")}
    dtypes.update({init.name: init.data_type for init in g.initializer})
    for n in g.node:
        t = _attr(n, "value") if n.op_type == "Constant" else None
        if t is not None:
            dtypes[n.output[0]] = t.data_type
    return dtypes, err


def _opset_errors(model: onnx.ModelProto, opset: int, table: OperatorTable) -> list[str]:
    lo, hi = table.opset_range
    errors = [] if lo <= opset <= hi else [
        f"opset {opset} outside [{lo}, {hi}] documented for TensorRT {table.trt_version[0]}.{table.trt_version[1]}; "
        f"re-export with opset {lo}..{hi}"
    ]
    errors += [f"custom op domain {o.domain!r} would need a TensorRT plugin; export with standard ops only"
               for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    return errors


def _node_kind_error(n: onnx.NodeProto) -> str | None:
    """Why node ``n`` cannot be in a graph we ship whatever its types (control flow, sequences, plugins)."""
    op, label = n.op_type, n.name or n.op_type
    if op in CONTROL_FLOW:
        return f"{op} node {label!r}: control flow is not allowed (the sampler must be unrolled straight-line code)"
    if op.startswith(_SEQUENCE_PREFIXES) or op in _SEQUENCE_OPS:
        return f"{op} node {label!r}: sequence/optional ops are not supported by TensorRT"
    if n.domain not in ("", "ai.onnx"):
        return f"node {label!r} is {n.domain}::{op}: custom domains need a TensorRT plugin"
    return None


def _checked_tensors(n: onnx.NodeProto) -> list[str]:
    """The tensors whose dtype must be in ``n``'s supported types (point 3 of the module docstring)."""
    op = n.op_type
    if op in ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"):
        return [n.output[0]] if n.output else []
    checked = [x for x in n.input[1:] if x] if op == "Where" else ([n.input[0]] if n.input and n.input[0] else [])
    if op in ("Cast", "CastLike") and n.output:
        checked.append(n.output[0])
    return checked


def _restriction_findings(n: onnx.NodeProto, consts: set[str]) -> tuple[list[str], list[str]]:
    """Documented restrictions checkable without TensorRT (point 5): ``(errors, warnings)``."""
    op, label = n.op_type, n.name or n.op_type
    errors: list[str] = []
    warnings: list[str] = []
    if op.startswith("Reduce") and len(n.input) > 1 and n.input[1] and n.input[1] not in consts:
        errors.append(f"{op} node {label!r}: axes must be an initializer/constant for TensorRT")
    if op == "Resize":
        mode = _attr(n, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "cubic":
            warnings.append(
                f"Resize node {label!r} uses mode=cubic: operators.md lists nearest/linear only; TensorRT's "
                "IResizeLayer supports kCUBIC -- confirm with a TensorRT build on a GPU host"
            )
        elif mode not in ("nearest", "linear"):
            errors.append(f"Resize node {label!r}: mode {mode!r} unsupported by TensorRT")
        if _attr(n, "antialias", 0):
            errors.append(f"Resize node {label!r}: antialias is not supported by TensorRT")
    if op == "TopK" and _attr(n, "sorted", 1) != 1:
        errors.append(f"TopK node {label!r}: TensorRT needs sorted=1")
    return errors, warnings


def _graph_io_errors(model: onnx.ModelProto) -> list[str]:
    errors = []
    for vi in (*model.graph.input, *model.graph.output):
        et = vi.type.tensor_type.elem_type
        if _ELEM.get(et) in ("DOUBLE", "STRING", None) or _ELEM.get(et, "").startswith("UINT1"):
            errors.append(f"graph I/O {vi.name!r} has type {_ELEM.get(et, et)}, not a TensorRT I/O type")
    return errors


def _parser_errors(counts: dict[str, int], rep: LintReport) -> list[str]:
    """Ops the installed TensorRT's parser refuses, where one can be asked (see the module docstring)."""
    asked = tensorrt_parser_support(op for op in counts if op in documented_table().types)
    if asked is None:
        return []
    version, support = asked
    rep.checked_against.append(f"TensorRT {version}'s ONNX parser")
    return [f"op {op} ({counts[op]}x): TensorRT {version}'s ONNX parser does not support it"
            for op, ok in sorted(support.items()) if not ok]


def lint_model(model: onnx.ModelProto | str | Path, target: tuple[int, int] = TARGET_TRT) -> LintReport:
    """Lint one ONNX model (a ModelProto or a path) for TensorRT ``target`` and later."""
    table = documented_table()
    if table.trt_version > target:
        raise ValueError(f"the operator table documents {table.label}, newer than the target {target}: "
                         "it would accept ops the target cannot parse")
    name, model = _load(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes = list(_all_nodes(model.graph))
    counts = collections.Counter(n.op_type for n in nodes)
    rep = LintReport(name=name, opset=opset, op_counts=dict(sorted(counts.items())), checked_against=[table.label])
    dtypes, type_err = _tensor_dtypes(model)
    rep.errors += [type_err] if type_err else []
    rep.errors += _opset_errors(model, opset, table)

    consts = _const_names(model.graph)
    unsupported: set[str] = set()
    dtype_issues: collections.Counter[tuple[str, str]] = collections.Counter()
    for n in nodes:
        kind_error = _node_kind_error(n)
        if kind_error:
            rep.errors.append(kind_error)
            continue
        types = table.types.get(n.op_type)
        if types is None:
            unsupported.add(n.op_type)
            continue
        for tname in _checked_tensors(n):
            tn = _ELEM.get(dtypes[tname], f"elem_type {dtypes[tname]}") if tname in dtypes else None
            if tn is not None and tn not in types:
                dtype_issues[(n.op_type, tn)] += 1
        errors, warnings = _restriction_findings(n, consts)
        rep.errors += errors
        rep.warnings += warnings
    rep.errors += [f"op {op} ({counts[op]}x) is not in TensorRT's supported ONNX operator list ({table.label})"
                   for op in sorted(unsupported)]
    rep.errors += [f"{k} {op} node(s) compute in {tn}, which TensorRT's {op} does not accept "
                   f"(supported: {', '.join(table.types[op])})" for (op, tn), k in sorted(dtype_issues.items())]
    rep.errors += _graph_io_errors(model)
    rep.errors += _parser_errors(counts, rep)
    return rep
