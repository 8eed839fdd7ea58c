"""The ModelOpt AutoCast internals diffgap replaces, in one place, scoped, for one ModelOpt version.

Conversion time: stock AutoCast (nvidia-modelopt 0.47) takes time quadratic in the node count on
the fused samplers (K unrolled DDIM steps, so the node count grows with K), and the FP16 file grows
with K as well. Profiling a conversion (``python -m cProfile``) shows three causes, all in
AutoCast's bookkeeping, none in its precision decisions:

1. ``PrecisionConverter._cleanup_no_consumer_nodes`` and ``remove_redundant_casts`` (via
   ``_bypass_cast_node``/``_is_sequential_cast``) call ``modelopt.onnx.utils.get_consumer_nodes`` /
   ``get_producer_nodes``, which scan the whole node list, once per node or Cast.
2. ``PrecisionConverter._add_cast`` finds the producer's position by a Python scan with protobuf
   equality, once per inserted Cast.
3. ``GraphSanitizer.duplicate_shared_constants`` gives every use of a shared initializer its own
   copy. The denoiser's weights are used at every unrolled step, so the file holds K copies of each
   weight and every whole-model pass after it (ByteSize, checker, shape inference, serialisation)
   pays for them.

:func:`linear_time_autocast` replaces exactly these pieces (:func:`patched_attributes` lists them)
for the duration of one conversion: (1) the same passes with a tensor -> node index kept exact
across the Cast bypasses; (2) Casts first inserted without the scan, then placed in one pass right
after their producers, where stock AutoCast puts them; (3) shared initializers stay shared
(AutoCast's own initializer pass already adds a copy of the other precision when a weight's
consumers differ in precision). With (1) and (2) alone the output is byte-identical to stock
AutoCast's; with (3) it has the same nodes with the same precisions and stores each weight at most
once per precision (tests/test_export_fp16.py checks both against stock AutoCast, on a sampler and
on an encoder). What is left above linear is stock ``remove_redundant_casts`` deleting each
redundant Cast with a list scan. The replacements copy nvidia-modelopt 0.47.0's code paths, so
:func:`linear_time_autocast` refuses any other installed version with one line saying what to
install; ``convert_fp16(..., linear_time=False)`` runs stock AutoCast (the tests compare the two).

Every replacement is active only inside ``with linear_time_autocast():`` and restored on exit, also
on error (tests/test_export_fp16.py compares the converted graphs with stock AutoCast's and checks the
restoration).
"""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from importlib import metadata
from typing import Iterable

import onnx

log = logging.getLogger(__name__)

MODELOPT_VERSION = "0.47.0"


def check_version() -> None:
    """Refuse an nvidia-modelopt other than :data:`MODELOPT_VERSION` (the replacements copy its code)."""
    try:
        installed = metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        raise ImportError(f"nvidia-modelopt is not installed; pip install 'nvidia-modelopt[onnx]=={MODELOPT_VERSION}'") from None
    if installed != MODELOPT_VERSION:
        raise ImportError(
            f"diffgap's linear-time AutoCast replaces nvidia-modelopt {MODELOPT_VERSION} internals but {installed} "
            f"is installed; pip install 'nvidia-modelopt[onnx]=={MODELOPT_VERSION}' (or convert with linear_time=False)"
        )


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


def patched_attributes() -> list[tuple[object, str]]:
    """``(owner, attribute)`` of every ModelOpt internal :func:`linear_time_autocast` replaces: the
    first three only while its ``remove_redundant_casts`` runs, the rest for the whole ``with`` block."""
    from modelopt.onnx import utils as ou
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    return [
        (ou, "get_consumer_nodes"), (ou, "get_producer_nodes"), (ou, "_bypass_cast_node"),
        (ou, "remove_redundant_casts"), (PrecisionConverter, "_cleanup_no_consumer_nodes"),
        (PrecisionConverter, "_add_cast"), (PrecisionConverter, "_convert_initializers_recursive"),
        (GraphSanitizer, "duplicate_shared_constants"),
    ]


@contextlib.contextmanager
def linear_time_autocast():
    """Swap AutoCast's three quadratic pieces for linear-time ones during one conversion (module docstring)."""
    check_version()
    from modelopt.onnx import utils as ou
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    stock = {(owner, attr): getattr(owner, attr) for owner, attr in patched_attributes()}

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
