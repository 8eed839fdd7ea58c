"""TensorRT engine behind the common :class:`~diffgap.runtime.session.Session` interface.

TensorRT 10/11 named-tensor API (``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``), one CUDA stream, page-locked host buffers and device buffers sized for the
profile's max batch (allocated once, so tensor addresses never change — which is also what lets a
captured CUDA graph be replayed). The stream is non-blocking: work another thread puts on the legacy
default stream neither waits for it nor invalidates a capture on it.

With ``cuda_graph=True`` the enqueue for each batch size is captured once into a CUDA graph and
replayed afterwards. A graph is tied to the shapes and state of the execution context it was captured
from (changing that context's input shapes and replaying an older graph is undefined), so each
captured batch size has its own context (:class:`ContextPerBatch`), whose input shapes are set once
and never changed; the contexts take turns on one stream and share one activation-memory block
(``USER_MANAGED`` allocation, ``set_device_memory`` with the engine's ``device_memory_size_v2``).
Capture and replay go through cuda-python's runtime API on the pycuda stream's handle
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
from .interface import Session, check_backend

log = logging.getLogger(__name__)


# CUDA driver API: cuStreamCreate flag for a stream that does not synchronise with the legacy default stream.
CU_STREAM_NON_BLOCKING = 0x1


class ContextPerBatch:
    """One TensorRT execution context per batch size, each with its input shapes set once, all sharing
    one activation-memory block and the session's I/O buffers.

    ``engine`` is a deserialised ``ICudaEngine``; ``addresses`` maps every I/O tensor to its device
    address; ``alloc(nbytes)`` returns a device allocation (``int()`` gives its address) that lives as
    long as this object. Contexts sharing memory must not run concurrently: the session's lock and
    single stream see to that.
    """

    def __init__(self, trt: Any, engine: Any, io: IOSpec, addresses: dict[str, int], stream: int, alloc: Any) -> None:
        self._trt, self._engine, self.io, self._addresses, self._stream = trt, engine, io, dict(addresses), stream
        self.memory_bytes = int(engine.device_memory_size_v2)  # the most any profile / shape needs
        self._memory = alloc(max(1, self.memory_bytes))
        self.contexts: dict[int, Any] = {}

    def get(self, batch: int) -> Any:
        ctx = self.contexts.get(batch)
        if ctx is not None:
            return ctx
        trt = self._trt
        ctx = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise RuntimeError(f"{self.io.name}: TensorRT could not create an execution context for batch {batch}")
        ctx.set_device_memory(int(self._memory), self.memory_bytes)
        ctx.set_optimization_profile_async(0, self._stream)
        for name, addr in self._addresses.items():
            if not ctx.set_tensor_address(name, addr):
                raise RuntimeError(f"{self.io.name}: set_tensor_address failed for {name!r}")
        for t in self.io.inputs:
            if not ctx.set_input_shape(t.name, t.concrete(batch)):
                raise ValueError(f"{self.io.name}: TensorRT refused shape {t.concrete(batch)} for {t.name!r} (outside the engine's profile)")
        self.contexts[batch] = ctx
        return ctx

    def close(self) -> None:
        self.contexts.clear()  # contexts before the memory they use
        free = getattr(self._memory, "free", None)
        if free is not None:
            free()
        self._memory = None


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
            self._stream = cuda.Stream(flags=CU_STREAM_NON_BLOCKING)
            self._host: dict[str, np.ndarray] = {}
            self._dev: dict[str, Any] = {}
            for t in (*self.io.inputs, *self.io.outputs):
                shape = t.concrete(self.io.max_batch)
                self._host[t.name] = cuda.pagelocked_empty(shape, dtype=t.np_dtype)
                self._dev[t.name] = cuda.mem_alloc(max(1, self._host[t.name].nbytes))
            addresses = {name: int(d) for name, d in self._dev.items()}
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._graphs: dict[int, CudaGraph] = {}
            self._context = self._per_batch = None
            if self.cuda_graph:
                # one context per batch size, for its graph and for plain calls at that size alike
                self._per_batch = ContextPerBatch(trt, self._engine, self.io, addresses, self._stream.handle, cuda.mem_alloc)
            else:
                # plain execution: one context whose input shapes follow each call
                self._context = self._engine.create_execution_context()
                if self._context is None:
                    raise RuntimeError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
                self._context.set_optimization_profile_async(0, self._stream.handle)
                for name, addr in addresses.items():
                    if not self._context.set_tensor_address(name, addr):
                        raise RuntimeError(f"{path}: set_tensor_address failed for {name!r}")
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
    def infer(self, feeds: dict[str, np.ndarray], *, cuda_graph: bool | None = None) -> dict[str, np.ndarray]:
        """``Session.infer``; ``cuda_graph=False`` runs one call of a graph session as a plain enqueue
        on the same execution context its graph for this batch replays (what replay is checked against)."""
        use = self.cuda_graph if cuda_graph is None else bool(cuda_graph)
        if use and not self.cuda_graph:
            raise ValueError(f"{self.name}: this session was opened with cuda_graph=False")
        batch, full = self.prepare_feeds(feeds)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: session is closed")
            out = self._run_locked(full, batch, use)
        self._check_outputs(out, batch)
        return out

    def _run(self, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: session is closed")
            return self._run_locked(feeds, batch, self.cuda_graph)

    def _run_locked(self, feeds: dict[str, np.ndarray], batch: int, graph: bool) -> dict[str, np.ndarray]:
        cuda = self._cuda
        self._ctx.push()
        try:
            if self._per_batch is not None:
                ctx = self._per_batch.get(batch)  # its input shapes were set for this batch, once
            else:
                ctx = self._context
                for t in self.io.inputs:
                    shape = t.concrete(batch)
                    if self._shapes.get(t.name) != shape:
                        if not ctx.set_input_shape(t.name, shape):
                            raise ValueError(f"{self.name}: TensorRT refused shape {shape} for {t.name!r} (outside the engine's profile)")
                        self._shapes[t.name] = shape
            for t in self.io.inputs:
                x = feeds[t.name]
                staged = self._host[t.name].reshape(-1)[: x.size].reshape(x.shape)
                np.copyto(staged, x)  # into page-locked memory so the async copy really is async
                cuda.memcpy_htod_async(self._dev[t.name], staged, self._stream)
            if graph:
                self._graph_for(batch, ctx).launch(self._stream.handle)
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

    def _graph_for(self, batch: int, ctx: Any) -> CudaGraph:
        """The CUDA graph of one enqueue of ``ctx`` (this batch size's own context), captured on first use."""
        g = self._graphs.get(batch)
        if g is not None:
            return g
        stream = self._stream
        # TensorRT does shape-dependent setup on the first enqueue after set_input_shape; that work
        # must not land inside the capture, so run once un-captured first (TensorRT developer guide,
        # "CUDA Graphs"). The inputs are already on the device: this run's outputs are the call's.
        if not ctx.execute_async_v3(stream.handle):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed before graph capture")
        stream.synchronize()
        g = CudaGraph.capture(stream.handle, lambda: ctx.execute_async_v3(stream.handle), what=f"{self.name}: TensorRT enqueue")
        self._graphs[batch] = g
        log.debug("%s: captured a CUDA graph for batch %d on its own execution context", self.name, batch)
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
        per_batch = getattr(self, "_per_batch", None)
        if per_batch is not None:
            per_batch.close()
        for name in ("_graphs", "_per_batch", "_context", "_stream", "_engine", "_runtime"):
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
