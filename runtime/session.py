"""One small inference interface for every backend: ``load -> infer(dict) -> dict``.

Backends (the caller names one and gets it, or a clear error — never a silent fallback):

- ``"ort-cpu"``   onnxruntime, CPU execution provider (the embedded default);
- ``"ort-cuda"``  onnxruntime, CUDA execution provider;
- ``"ort-trt"``   onnxruntime, TensorRT execution provider (as :mod:`diffgap.runtime.ort_trt` sets it up:
  the graph's own types, the IOSpec's profile, an engine cache);
- ``"tensorrt"``  TensorRT engine + pycuda, CUDA graphs through cuda-python
  (:class:`diffgap.runtime.trt_session.TrtSession`).

Every session carries the module's :class:`~diffgap.core.iospec.IOSpec` (from the export manifest, the
ONNX ``metadata_props`` key :data:`ONNX_IO_SPEC_KEY`, or an engine's sidecar json), checks every feed
against it (dtype, rank, shape, batch vs the profile, NaN/Inf) before running, fills omitted optional
inputs with their declared default, and checks every output against it afterwards.

The interface itself (:class:`Session`, the backend names) lives in :mod:`diffgap.runtime.interface`,
which the TensorRT backend builds on. Before an ``ort-cuda`` / ``ort-trt`` session is created,
:mod:`diffgap.runtime.gpu_libs` loads the CUDA, cuDNN and TensorRT libraries that pip installed, so no
``LD_LIBRARY_PATH`` is needed; ``device`` reaches every GPU provider of the backend.

Torch-free: numpy + onnxruntime (imported lazily) + the contract modules.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffgap.core.errors import BackendUnavailable, MissingDependency, UserError
from diffgap.core.fsutil import sha256_file
from diffgap.core.iospec import IOSpec, TensorSpec
from diffgap.core.manifest import Manifest
from diffgap.core.names import META_IO_SPEC

from .gpu_libs import prepare_onnxruntime
from .interface import BACKENDS, PRECISIONS, Session, check_backend  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

# The ONNX metadata_props key under which the exporter stores ``IOSpec.to_dict()`` as json.
ONNX_IO_SPEC_KEY = META_IO_SPEC

# Execution providers each ORT backend asks for, in priority order. The CPU provider is listed last
# on purpose: ORT runs the few nodes an accelerator EP does not claim on CPU (per-node placement,
# documented ORT behaviour); whether the *requested* EP is active is checked after creation.
_ORT_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}

# onnxruntime's NodeArg.type strings for the dtypes IOSpec knows.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


# onnxruntime exception classes (onnxruntime.capi.onnxruntime_pybind11_state) that mean the *file* is
# at fault: not an ONNX protobuf at all / cut short (INVALID_PROTOBUF), or a protobuf whose graph
# ORT rejects (INVALID_GRAPH). Every other ORT error (FAIL, EP_FAIL, RUNTIME_EXCEPTION, NOT_IMPLEMENTED
# ...) is about the provider, the libraries or the machine and is reported as ORT said it.
_ORT_NOT_ONNX = "InvalidProtobuf"
_ORT_BAD_GRAPH = "InvalidGraph"


def _ort_load_error(e: Exception, path: Path, backend: str) -> Exception:
    """A one-line error for a failed ``InferenceSession(path)`` that blames the right thing."""
    kind = type(e).__name__
    text = str(e).strip()
    first = (text.splitlines()[0] if text else kind)[:400]
    if kind == _ORT_NOT_ONNX:
        return UserError(f"{path} is not an ONNX model or is truncated (onnxruntime: {first}); re-export it with `diffgap export`")
    if kind == _ORT_BAD_GRAPH:
        return UserError(f"{path} is an ONNX file whose graph onnxruntime rejects (onnxruntime: {first}); re-export it with `diffgap export`")
    return RuntimeError(f"onnxruntime could not create a {backend!r} session for {path} ({kind}: {first})")


# ----------------------------------------------------------------------------------------------
# onnxruntime
# ----------------------------------------------------------------------------------------------
def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - the runtime extra is missing
        raise MissingDependency("onnxruntime is not installed; `pip install diffgap[runtime]` (or [gpu] on a GPU host)") from e
    return ort


def io_spec_from_metadata(meta: Mapping[str, str], where: str) -> IOSpec:
    """The IOSpec stored as json under :data:`ONNX_IO_SPEC_KEY` in ONNX ``metadata_props``."""
    if ONNX_IO_SPEC_KEY not in meta:
        raise ValueError(
            f"{where} carries no {ONNX_IO_SPEC_KEY!r} metadata; export it with `diffgap export` or pass the "
            f"I/O declaration explicitly (open it through the export dir with open_model)"
        )
    try:
        d = json.loads(meta[ONNX_IO_SPEC_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: metadata {ONNX_IO_SPEC_KEY!r} is not valid json ({e}); re-export") from e
    return IOSpec.from_dict(d)


def ort_providers(
    backend: str, provider_options: Mapping[str, Any] | None = None, device: int | None = None,
) -> list[str | tuple[str, dict[str, Any]]]:
    """onnxruntime's ``providers`` list for ``backend``: the requested provider with ``provider_options``,
    and ``device_id`` on EVERY GPU provider (``ort-trt``'s CUDA fallback runs the nodes TensorRT does
    not take, and must run them on the same GPU). The CPU provider takes neither."""
    if backend not in _ORT_PROVIDERS:
        raise ValueError(f"onnxruntime runs {sorted(_ORT_PROVIDERS)}, not {backend!r}")
    given = dict(provider_options or {})
    if device is None and "device_id" in given:
        device = int(given["device_id"])
    if device is not None and backend == "ort-cpu":
        raise ValueError("device= selects a GPU; backend 'ort-cpu' has none")
    wanted = _ORT_PROVIDERS[backend][0]
    out: list[str | tuple[str, dict[str, Any]]] = []
    for p in _ORT_PROVIDERS[backend]:
        if p == "CPUExecutionProvider":
            out.append(p)
            continue
        opts = dict(given) if p == wanted else {}
        if device is not None:
            opts["device_id"] = int(device)
        out.append((p, opts) if opts else p)
    return out


class OrtSession(Session):
    """An onnxruntime ``InferenceSession`` behind the common interface.

    ``backend`` picks the execution provider; if that provider cannot be created on this machine
    (ORT itself would quietly fall back to CPU) the constructor raises
    :class:`~diffgap.core.errors.BackendUnavailable` (a ``RuntimeError``).
    ``provider_options`` go to that provider; ``device`` (a CUDA device index) to every GPU provider
    of the backend (:func:`ort_providers`).
    """

    def __init__(
        self,
        path: str | Path,
        io: IOSpec | None = None,
        backend: str = "ort-cpu",
        precision: str = "fp32",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str = "all",
        provider_options: Mapping[str, Any] | None = None,
        spin_wait: bool | None = None,
        device: int | None = None,
    ) -> None:
        check_backend(backend, precision)
        if backend not in _ORT_PROVIDERS:
            raise ValueError(f"OrtSession runs {sorted(_ORT_PROVIDERS)}, not {backend!r}; use TrtSession for 'tensorrt'")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found; run `diffgap export` or check the path")
        ort = _import_ort()
        self.backend = backend
        wanted = _ORT_PROVIDERS[backend][0]
        if wanted not in ort.get_available_providers():
            raise BackendUnavailable(
                f"backend {backend!r} needs onnxruntime's {wanted}, which this onnxruntime build lacks "
                f"(has {ort.get_available_providers()}); install onnxruntime-gpu or choose backend='ort-cpu'"
            )

        so = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if graph_optimization not in levels:
            raise ValueError(f"graph_optimization must be one of {sorted(levels)}, got {graph_optimization!r}")
        so.graph_optimization_level = levels[graph_optimization]
        if intra_op_threads is not None:
            so.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            so.inter_op_num_threads = int(inter_op_threads)
        if spin_wait is not None:
            # Idle intra-op workers busy-wait for the next op (ORT's default: lowest latency for one
            # session alone). False lets them sleep: what several sessions taking turns on few cores want.
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        so.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here

        providers = ort_providers(backend, provider_options, device)
        prepare_onnxruntime(ort, backend)  # CUDA/cuDNN/TensorRT libraries from pip, loaded by path
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:  # ORT's own exception classes; see _ort_load_error
            raise _ort_load_error(e, path, backend) from e
        active = self._sess.get_providers()
        if wanted not in active:
            # ORT drops an EP whose libraries/driver/GPU are missing and carries on with CPU.
            raise BackendUnavailable(
                f"backend {backend!r}: onnxruntime could not initialise {wanted} on this machine (active "
                f"providers: {active}; check the CUDA/cuDNN/TensorRT libraries and that a GPU is visible), "
                f"or choose backend='ort-cpu'"
            )
        if io is None:
            io = io_spec_from_metadata(self._sess.get_modelmeta().custom_metadata_map, str(path))
        super().__init__(io, path, precision)
        self._check_graph_matches_io()
        self._output_names = self.io.output_names
        log.debug("loaded %s with providers %s", path, active)

    @property
    def providers(self) -> list[str]:
        return list(self._sess.get_providers())

    def _check_graph_matches_io(self) -> None:
        """The graph's own I/O must be exactly the declaration (catches a foreign or stale file)."""

        def compare(kind: str, args, specs: tuple[TensorSpec, ...]) -> None:
            got = {a.name: a for a in args}
            want = {t.name for t in specs}
            if set(got) != want:
                raise ValueError(
                    f"{self.path}: graph {kind}s {sorted(got)} differ from the declared {sorted(want)} of "
                    f"{self.io.name!r}; the file belongs to another model or export, re-export it"
                )
            for t in specs:
                a = got[t.name]
                dtype = _ORT_TYPES.get(a.type, a.type)
                if dtype != t.dtype:
                    raise ValueError(f"{self.path}: {kind} {t.name!r} is {a.type} in the graph but declared {t.dtype}; re-export")
                if len(a.shape) != len(t.shape):
                    raise ValueError(f"{self.path}: {kind} {t.name!r} has rank {len(a.shape)} in the graph but declared {list(t.shape)}; re-export")
                for g, s in zip(a.shape[1:], t.shape[1:]):
                    if isinstance(g, int) and g != s:
                        raise ValueError(f"{self.path}: {kind} {t.name!r} has shape {a.shape} in the graph but declared {list(t.shape)}; re-export")

        compare("input", self._sess.get_inputs(), self.io.inputs)
        compare("output", self._sess.get_outputs(), self.io.outputs)

    def _run(self, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        if self._sess is None:
            raise RuntimeError(f"{self.name}: session is closed")
        ys = self._sess.run(self._output_names, feeds)
        return dict(zip(self._output_names, ys))

    def close(self) -> None:
        self._sess = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------
# factories
# ----------------------------------------------------------------------------------------------
def load(
    path: str | Path,
    backend: str | None = None,
    io: IOSpec | None = None,
    precision: str | None = None,
    **options: Any,
) -> Session:
    """Open one model file: ``.onnx`` with onnxruntime (default backend ``ort-cpu``), ``.plan`` /
    ``.engine`` with TensorRT. ``io`` defaults to the file's own declaration (ONNX metadata or the
    engine's sidecar json); ``precision`` is a label here (the file decides the arithmetic),
    default ``fp32`` for ONNX and the sidecar's for engines."""
    path = Path(path)
    suffix = path.suffix.lower()
    if backend is None:
        backend = "tensorrt" if suffix in (".plan", ".engine") else "ort-cpu"
    check_backend(backend, precision or "fp32")
    if backend == "tensorrt":
        if suffix == ".onnx":
            raise ValueError(f"backend 'tensorrt' runs built engines, not {path.name}; run `diffgap build-engines` first")
        from .trt_session import TrtSession

        return TrtSession(path, io=io, precision=precision, **options)
    if suffix not in (".onnx", ""):
        raise ValueError(f"backend {backend!r} runs ONNX files, not {path.name}")
    return OrtSession(path, io=io, backend=backend, precision=precision or "fp32", **options)


def ort_provider_options(
    backend: str, io: IOSpec, cache_dir: Path, given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Provider options :func:`open_model` gives the ``ort-*`` backend's accelerator: for ``ort-trt``
    :func:`~diffgap.runtime.ort_trt.ort_trt_options` (the graph's types, the IOSpec's profile, an engine
    cache in ``cache_dir``, created here), then the caller's own options. The device goes to every GPU
    provider separately (:func:`ort_providers`)."""
    out: dict[str, Any] = {}
    if backend == "ort-trt":
        from .ort_trt import ort_trt_options

        # ORT's TensorRT EP keeps its own engine/timing caches, beside (not inside) ours
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        out.update(ort_trt_options(io, cache_dir))
    out.update(given or {})  # the caller's word wins
    return out


def verify_export_file(man: Manifest, rel: str) -> None:
    """Check one exported file against its manifest sha256 (missing, truncated or replaced -> error)."""
    p = man.root / rel
    if not p.is_file():
        raise FileNotFoundError(f"{p} (listed in {man.root}/manifest.json) is missing; re-run `diffgap export`")
    rec = man.files.get(rel)
    if rec is None:
        raise UserError(f"{rel} is not hashed in {man.root}/manifest.json; re-run `diffgap export`")
    if p.stat().st_size != rec.get("bytes", p.stat().st_size) or sha256_file(p) != rec["sha256"]:
        raise UserError(f"{p} does not match its sha256 in manifest.json (truncated or replaced); re-run `diffgap export`")


def open_model(
    export_dir: str | Path | Manifest,
    name: str,
    backend: str = "ort-cpu",
    precision: str = "fp32",
    *,
    verify: bool = True,
    engine_dir: str | Path | None = None,
    **options: Any,
) -> Session:
    """Open model ``name`` of an export directory on ``backend`` at ``precision``.

    ``ort-*`` backends run ``<name>.onnx`` (fp32) or ``<name>.fp16.onnx`` (fp16); ``tensorrt`` runs
    the engine ``diffgap build-engines`` made for this host (see :mod:`diffgap.runtime.engine`).
    The IOSpec always comes from ``manifest.json``; with ``verify`` the file's sha256 is checked
    against the manifest first. ``options`` go to the backend (``intra_op_threads``, ``spin_wait``,
    ``provider_options``; ``cuda_graph`` for TensorRT; ``device``, the CUDA device index, for
    TensorRT and the ORT GPU backends).
    """
    check_backend(backend, precision)
    man = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir)
    entry = man.model(name)
    rel = entry.file(precision)
    if verify:
        verify_export_file(man, rel)
    if backend == "tensorrt":
        from .engine import find_engine
        from .trt_session import TrtSession

        plan = find_engine(man, name, precision, engine_dir=engine_dir, device=options.get("device", 0))
        return TrtSession(plan, io=entry.io, precision=precision, **options)
    if backend == "ort-cpu" and precision == "fp16":
        log.info("%s: ORT's CPU provider computes FP16 graphs in float32 after casts; this measures weight rounding only", name)
    device = options.pop("device", None)
    if device is not None and backend == "ort-cpu":
        raise ValueError("device= selects a GPU; backend 'ort-cpu' has none")
    cache = (Path(engine_dir) if engine_dir else man.root / "engines") / "ort-trt-cache"
    opts = ort_provider_options(backend, entry.io, cache, options.pop("provider_options", None))
    if opts:
        options["provider_options"] = opts
    return OrtSession(man.root / rel, io=entry.io, backend=backend, precision=precision, device=device, **options)
