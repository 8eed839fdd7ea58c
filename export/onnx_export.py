"""Generic ONNX export of one module from its :class:`~diffgap.core.iospec.IOSpec`.

``export_module(module, io_spec, path)`` reads tensor names, dtypes, the dynamic batch axis and a
sample input from the module's one I/O declaration, exports, stamps the declared shapes and
``metadata_props`` into the graph, runs ``onnx.checker.check_model(full_check=True)`` and strict
shape inference, and writes the file atomically.

Exporter choice (torch 2.14.1): the **TorchScript-based exporter**
(``torch.onnx.export(..., dynamo=False)``).

* Both exporters give straight-line graphs with a dynamic batch axis and no Loop/If for our modules
  (the sampler loop is a Python loop over constant timesteps, so tracing unrolls it).
* The dynamo exporter's graphs are tidier (fewer Shape/Constant nodes), but it exports a sampler
  many times slower than the TorchScript exporter (export time grows with K x graph size),
  and it fails outright on any ``.item()``/python-float conversion of a tensor inside ``forward``.
* laion-clap's HTS-AT batch freeze (``int(windows.shape[0] / ...)``) is a *tracing* hazard; the
  encoder module's ``batch_agnostic_htsat`` fix targets exactly this exporter, and the parity checks
  (:mod:`diffgap.export.check`) prove the dynamic batch at B = 1, 3, 8.

After export the graph is simplified with ``onnxslim`` (constant folding, common-subexpression and
dead-code elimination; node names, I/O and metadata are kept): the TorchScript exporter leaves one
``Constant`` per scalar and recomputes shape arithmetic per sampler step; slimming removes those
nodes, which every later pass (FP16 conversion, TensorRT parsing) benefits from. Parity is always
measured on the final file.

Opset 17 (inside every TensorRT 10.x ONNX parser's documented range, and the first opset with a
LayerNormalization op: one node, which :mod:`diffgap.export.fp16` keeps in FP32). ONNX's ``dim_param`` for the batch axis is the IOSpec's
``"batch"``; feature dims are written as fixed values so consumers (TensorRT profiles, Triton
configs) see exactly what the IOSpec declares.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from diffgap.core.fsutil import atomic_path
from diffgap.core import names
from diffgap.core.iospec import BATCH, IOSpec, onnx_elem_type

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17
TRACE_BATCH = 2  # example batch for tracing: != 1 so a frozen batch axis shows up in parity at B=1,3,8
META_IOSPEC = names.META_IO_SPEC
META_GRAPH_PRECISION = names.META_GRAPH_PRECISION


def _sample_args(io: IOSpec, batch: int, seed: int = 0) -> tuple:
    import torch

    feeds = io.sample_inputs(batch, seed=seed)
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in io.inputs)


def _stamp_io(model: onnx.ModelProto, io: IOSpec) -> None:
    """Check graph I/O against the IOSpec (names, order, dtypes) and write the declared shapes."""
    g = model.graph
    got_in = [i.name for i in g.input if i.name not in {x.name for x in g.initializer}]
    if got_in != io.input_names:
        raise ValueError(
            f"{io.name}: exported graph inputs {got_in} differ from the declared {io.input_names} "
            "(an input the module ignores is dropped by the tracer); make forward() use every declared input"
        )
    got_out = [o.name for o in g.output]
    if got_out != io.output_names:
        raise ValueError(f"{io.name}: exported graph outputs {got_out} differ from the declared {io.output_names}")
    for vi, spec in zip([*g.input[: len(io.inputs)], *g.output], [*io.inputs, *io.outputs]):
        tt = vi.type.tensor_type
        want = onnx_elem_type(spec.dtype)
        if tt.elem_type != want:
            raise ValueError(
                f"{io.name}: tensor {spec.name!r} exported as ONNX type {tt.elem_type}, declared {spec.dtype}"
            )
        del tt.shape.dim[:]
        for s in spec.shape:
            d = tt.shape.dim.add()
            if s == BATCH:
                d.dim_param = BATCH
            else:
                d.dim_value = int(s)


def set_metadata(model: onnx.ModelProto, meta: Mapping[str, Any]) -> None:
    """Replace/insert ``metadata_props`` entries (values JSON-encoded unless already strings)."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        val = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        if k in existing:
            existing[k].value = val
        else:
            p = model.metadata_props.add()
            p.key, p.value = k, val


def read_metadata(model: onnx.ModelProto | str | Path) -> dict[str, str]:
    """The graph's ``metadata_props`` as a dict of strings (load a path lazily, weights included)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def check_and_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Full ONNX checker + strict shape inference; returns the inferred model (raises on failure)."""
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Check, then write ``model`` to ``path`` atomically (never half-written)."""
    path = Path(path)
    check_and_infer(model)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError as e:
        raise ImportError(f"graph simplification needs onnxslim ({e}); install the export extra: pip install -e '.[export]'") from e
    n0 = len(model.graph.node)
    out = onnxslim.slim(model)
    log.debug("onnxslim: %d -> %d nodes", n0, len(out.graph.node))
    return out


def export_module(
    module,
    io_spec: IOSpec,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
    trace_batch: int = TRACE_BATCH,
    simplify: bool = True,
) -> onnx.ModelProto:
    """Export ``module`` (an ``nn.Module`` whose ``forward`` takes the IOSpec inputs in order) to ``path``.

    Returns the saved ModelProto (with inferred shapes). ``metadata`` entries plus the IOSpec JSON
    (key ``diffgap.io_spec``) go into ``metadata_props``.
    """
    import torch

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use opset >= {MIN_OPSET}")
    path = Path(path)
    trace_batch = max(io_spec.min_batch, min(trace_batch, io_spec.max_batch))
    args = _sample_args(io_spec, trace_batch)
    module = module.eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about python-int shape math
        # it records as constants; the latter is what the B = 1, 3, 8 parity checks guard against.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(tmp),
            input_names=io_spec.input_names,
            output_names=io_spec.output_names,
            dynamic_axes=io_spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        model = onnx.load(str(tmp))
        if simplify:
            model = _simplify(model)
        model.graph.name = io_spec.name
        model.producer_name = "diffgap"
        from diffgap import __version__

        model.producer_version = __version__
        _stamp_io(model, io_spec)
        meta = dict(metadata or {})
        meta[META_IOSPEC] = io_spec.to_dict()
        set_metadata(model, meta)
        inferred = check_and_infer(model)
        onnx.save_model(model, str(tmp))
    log.info("exported %s -> %s (%d nodes, opset %d)", io_spec.name, path, len(model.graph.node), opset)
    return inferred
