"""TensorRT engine behind the common :class:`~diffgap.runtime.session.Session` interface.

TensorRT 10/11 named-tensor API (``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``), one CUDA stream, page-locked host buffers and device buffers sized for the
profile's max batch (allocated once, so tensor addresses never change — which is also what lets a
captured CUDA graph be replayed). With ``cuda_graph=True`` the enqueue for each batch size is
captured once into a CUDA graph and replayed afterwards (static shapes per batch size); capture and
replay go through cuda-python's runtime API on the pycuda stream's handle
(:mod:`diffgap.runtime.cuda_graphs`), since pycuda itself has no graph API.

tensorrt, pycuda and cuda-python are imported when a session is created, never at module import.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from diffgap.core.iospec import IOSpec

from .cuda_graphs import CudaGraph, import_cudart
from .engine import EngineMeta, HostInfo, check_device_index, import_pycuda, import_tensorrt, trt_logger
from .session import Session, check_backend

log = logging.getLogger(__name__)


class TrtSession(Session):
    """Run one serialized TensorRT engine (``.plan``) on one GPU.

    ``io`` defaults to the declaration stored in the engine's sidecar json (written by
    ``diffgap build-engines``). Before deserialising, the sidecar's TensorRT version, GPU name,
    compute capability and engine sha256 are compared with this host and file: an engine built
    elsewhere, or truncated, is refused with a message saying how to rebuild it.
    """

    backend = "tensorrt"

    def __init__(
        self,
        path: str | Path,
        io: IOSpec | None = None,
        precision: str | None = None,
        device: int = 0,
        cuda_graph: bool = False,
        check_host: bool = True,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine {path} not found; build it with `diffgap build-engines EXPORT_DIR`")
        meta = EngineMeta.read(path) if EngineMeta.sidecar(path).exists() else None
        if precision is None:
            precision = meta.precision if meta is not None else "fp16"
        check_backend("tensorrt", precision)
        if io is None:
            if meta is None:
                raise ValueError(f"{path} has no sidecar {EngineMeta.sidecar(path).name}; pass io= or rebuild with `diffgap build-engines`")
            io = meta.io
        super().__init__(io, path, precision)
        self.cuda_graph = bool(cuda_graph)
        # One stream and one set of staging buffers: calls from several threads take turns.
        self._lock = threading.Lock()

        trt = import_tensorrt()
        cuda = import_pycuda()
        if self.cuda_graph:
            import_cudart()  # fail now, not on the first call, when cuda-python is missing
        self._trt, self._cuda = trt, cuda
        self.device = check_device_index(device)
        if meta is not None:
            meta.check_file(path)
            if check_host:
                meta.check_host(HostInfo.current(device), path)

        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        self._closed = False
        try:
            self._runtime = trt.Runtime(trt_logger())
            try:
                self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            except Exception as e:  # some TensorRT builds raise instead of returning None
                log.debug("deserialize_cuda_engine raised %r", e)
                self._engine = None
            if self._engine is None:
                raise ValueError(
                    f"TensorRT {trt.__version__} could not deserialize {path} (truncated, or built by another "
                    f"TensorRT version or for another GPU); rebuild it with `diffgap build-engines`"
                )
            self._check_engine_matches_io()
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise RuntimeError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
            self._stream = cuda.Stream()
            self._context.set_optimization_profile_async(0, self._stream.handle)
            self._host: dict[str, np.ndarray] = {}
            self._dev: dict[str, Any] = {}
            for t in (*self.io.inputs, *self.io.outputs):
                shape = t.concrete(self.io.max_batch)
                self._host[t.name] = cuda.pagelocked_empty(shape, dtype=t.np_dtype)
                self._dev[t.name] = cuda.mem_alloc(max(1, self._host[t.name].nbytes))
                if not self._context.set_tensor_address(t.name, int(self._dev[t.name])):
                    raise RuntimeError(f"{path}: set_tensor_address failed for {t.name!r}")
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._graphs: dict[int, CudaGraph] = {}
        except BaseException:
            self._release()
            self._ctx.pop()
            self._ctx.detach()
            self._closed = True
            raise
        self._ctx.pop()

    # -- checks -----------------------------------------------------------------------------
    def _check_engine_matches_io(self) -> None:
        trt, eng = self._trt, self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        declared = self.io.input_names + self.io.output_names
        if sorted(names) != sorted(declared):
            raise ValueError(f"{self.path}: engine tensors {sorted(names)} differ from the declared {sorted(declared)}; rebuild the engine")
        for t in (*self.io.inputs, *self.io.outputs):
            is_input = t.name in self.io.input_names
            mode = eng.get_tensor_mode(t.name)
            if (mode == trt.TensorIOMode.INPUT) != is_input:
                raise ValueError(f"{self.path}: tensor {t.name!r} has mode {mode} in the engine; rebuild the engine")
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(t.name)))
            if dtype != t.np_dtype:
                raise ValueError(f"{self.path}: tensor {t.name!r} is {dtype} in the engine but declared {t.dtype}; rebuild from the current export")
            shape = tuple(eng.get_tensor_shape(t.name))
            if len(shape) != len(t.shape) or any(g != -1 and g != s for g, s in zip(shape[1:], t.shape[1:])):
                raise ValueError(f"{self.path}: tensor {t.name!r} has shape {shape} in the engine but declared {list(t.shape)}; rebuild")
            if is_input:
                lo, opt, hi = (tuple(s) for s in eng.get_tensor_profile_shape(t.name, 0))
                want = self.io.profile(t.name)
                if (lo, opt, hi) != want:
                    raise ValueError(
                        f"{self.path}: input {t.name!r} has profile min/opt/max {lo}/{opt}/{hi} but the declaration says "
                        f"{want[0]}/{want[1]}/{want[2]}; rebuild with `diffgap build-engines`"
                    )

    # -- running ----------------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: session is closed")
            return self._run_locked(feeds, batch)

    def _run_locked(self, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        cuda, ctx = self._cuda, self._context
        self._ctx.push()
        try:
            for t in self.io.inputs:
                x = feeds[t.name]
                staged = self._host[t.name].reshape(-1)[: x.size].reshape(x.shape)
                np.copyto(staged, x)  # into page-locked memory so the async copy really is async
                if self._shapes.get(t.name) != x.shape:
                    if not ctx.set_input_shape(t.name, x.shape):
                        raise ValueError(f"{self.name}: TensorRT refused shape {x.shape} for {t.name!r} (outside the engine's profile)")
                    self._shapes[t.name] = x.shape
                cuda.memcpy_htod_async(self._dev[t.name], staged, self._stream)
            if self.cuda_graph:
                self._graph_for(batch).launch(self._stream.handle)
            elif not ctx.execute_async_v3(self._stream.handle):
                raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
            out: dict[str, np.ndarray] = {}
            for t in self.io.outputs:
                shape = t.concrete(batch)
                got = tuple(ctx.get_tensor_shape(t.name))
                if got != shape:
                    raise RuntimeError(f"{self.name}: engine output {t.name!r} has shape {got}, declared {shape}; rebuild the engine")
                view = self._host[t.name].reshape(-1)[: int(np.prod(shape))].reshape(shape)
                cuda.memcpy_dtoh_async(view, self._dev[t.name], self._stream)
                out[t.name] = view
            self._stream.synchronize()
            # Copies: the pinned buffers are reused by the next call.
            return {k: v.copy() for k, v in out.items()}
        finally:
            self._ctx.pop()

    def _graph_for(self, batch: int) -> CudaGraph:
        """The CUDA graph of one enqueue at this batch size, captured on first use."""
        g = self._graphs.get(batch)
        if g is not None:
            return g
        stream = self._stream
        # TensorRT does shape-dependent setup on the first enqueue after set_input_shape; that work
        # must not land inside the capture, so run once un-captured first (TensorRT developer guide,
        # "CUDA Graphs").
        if not self._context.execute_async_v3(stream.handle):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed before graph capture")
        stream.synchronize()
        g = CudaGraph.capture(
            stream.handle, lambda: self._context.execute_async_v3(stream.handle), what=f"{self.name}: TensorRT enqueue",
        )
        self._graphs[batch] = g
        log.debug("%s: captured a CUDA graph for batch %d", self.name, batch)
        return g

    # -- lifecycle --------------------------------------------------------------------------
    def _release(self) -> None:
        # Inside the pushed CUDA context, graphs before the context before the engine (TensorRT's
        # destruction order); graph execs, pinned and device buffers are freed here, not at GC time.
        graphs = getattr(self, "_graphs", None) or {}
        errors = []
        for g in graphs.values():
            try:
                g.close()
            except RuntimeError as e:  # keep releasing the rest; report after
                errors.append(str(e))
        if errors:
            log.warning("%s: releasing CUDA graphs: %s", self.name, "; ".join(errors))
        for name in ("_graphs", "_context", "_stream", "_engine", "_runtime"):
            if hasattr(self, name):
                setattr(self, name, None)
        for d in getattr(self, "_dev", {}).values():
            d.free()
        self._dev = {}
        self._host = {}

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        with self._lock:
            if self._closed:
                return
            self._ctx.push()
            try:
                if getattr(self, "_stream", None) is not None:
                    self._stream.synchronize()
                self._release()
            finally:
                self._ctx.pop()
                self._ctx.detach()
                self._closed = True

    def __del__(self) -> None:  # best effort; explicit close() / `with` is the documented way
        try:
            self.close()
        except Exception:
            pass


def unavailable_reason() -> str | None:
    """None when TensorRT + pycuda + a CUDA device are usable here, else why not (one line).

    The GPU tests' skip reason and the benchmarks' "skipped" rows both read this.
    """
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"TensorRT is not installed here ({type(e).__name__}); run on a GPU host with `pip install -e .[gpu]`"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            return "no CUDA device visible to pycuda"
    except Exception as e:
        return f"pycuda/CUDA driver unavailable ({type(e).__name__}: {e})"
    return None
