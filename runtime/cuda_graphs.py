"""CUDA graphs through cuda-python's runtime API (``cuda.bindings.runtime``), on any stream handle.

pycuda has no CUDA-graph API in any release, so :class:`~diffgap.runtime.trt_session.TrtSession`
captures its enqueue with the CUDA runtime itself, on the raw ``cudaStream_t`` of its pycuda stream
(``pycuda.driver.Stream.handle``): ``cudaStreamBeginCapture`` -> work -> ``cudaStreamEndCapture``
-> ``cudaGraphInstantiate`` -> ``cudaGraphLaunch``, which is how NVIDIA's TensorRT diffusion demo
captures its engines too. Capture runs in thread-local mode (``cudaStreamCaptureModeThreadLocal``),
as Triton's TensorRT backend does: a ``cudaMalloc`` made by another thread meanwhile does not
invalidate the capture.

cuda-python returns every result as a tuple ``(cudaError_t, *values)`` instead of raising;
:func:`check` turns a non-success code into ``RuntimeError`` naming the call and the CUDA error.

cuda-python is imported when first needed (``cuda.bindings.runtime`` from cuda-python >= 12.6;
the older ``cuda.cudart`` module otherwise), never at module import.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from diffgap.core.errors import MissingDependency

log = logging.getLogger(__name__)

INSTALL_HINT = "`pip install -e .[gpu]` (cuda-python 13.x; `.[gpu-trt10]` for cuda-python 12.x on CUDA 12 drivers)"

_CUDART: Any = None


def import_cudart() -> Any:
    """cuda-python's CUDA runtime module, or ImportError saying how to install it."""
    global _CUDART
    if _CUDART is None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart  # cuda-python < 12.6 layout
            except ImportError as e:
                raise MissingDependency(f"CUDA-graph mode needs cuda-python: {INSTALL_HINT}, or pass cuda_graph=False") from e
        _CUDART = cudart
    return _CUDART


def error_name(cudart: Any, err: Any) -> str:
    """``cudaErrorInvalidValue`` for a ``cudaError_t`` (falls back to the enum's own name)."""
    try:
        status, name = cudart.cudaGetErrorName(err)
        if status == cudart.cudaError_t.cudaSuccess and name:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # an unknown code: the enum's name is still informative
        pass
    return getattr(err, "name", str(err))


def check(result: Any, what: str, cudart: Any | None = None) -> Any:
    """Unpack a cuda-python result tuple ``(cudaError_t, *values)``; raise on any error.

    Returns ``None`` for calls with no value, the value for one, a tuple for several.
    """
    cudart = cudart or import_cudart()
    if not isinstance(result, tuple) or not result:
        raise TypeError(f"{what}: expected cuda-python's (cudaError_t, ...) result tuple, got {type(result).__name__}")
    err, values = result[0], result[1:]
    if not isinstance(err, cudart.cudaError_t):
        raise TypeError(f"{what}: the first result is {type(err).__name__}, not cudaError_t")
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {error_name(cudart, err)} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class CudaGraph:
    """One captured and instantiated CUDA graph, replayable on a stream; ``close()`` frees both.

    ``CudaGraph.capture(stream, enqueue)`` records what ``enqueue()`` puts on ``stream`` (an int
    ``cudaStream_t``, e.g. ``pycuda.driver.Stream().handle``). ``enqueue`` returns False (or raises)
    to report a failed enqueue; the capture is ended either way, so the stream stays usable, and the
    partial graph is destroyed.
    """

    def __init__(self, graph: Any, exec_: Any, cudart: Any) -> None:
        self._graph, self._exec, self._cudart = graph, exec_, cudart

    @classmethod
    def capture(cls, stream: int, enqueue: Callable[[], bool], what: str = "enqueue") -> "CudaGraph":
        cudart = import_cudart()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture", cudart)
        ok, failure = False, None
        try:
            ok = bool(enqueue())
        except BaseException as e:  # re-raised after the capture is ended
            failure = e
        # End the capture whatever happened: a stream left capturing rejects all later work.
        end = cudart.cudaStreamEndCapture(stream)
        graph = end[1] if len(end) > 1 else None
        try:
            if failure is not None:
                raise failure
            check(end, "cudaStreamEndCapture", cudart)
            if not ok:
                raise RuntimeError(f"{what} failed during CUDA-graph capture; use cuda_graph=False")
            exec_ = check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate", cudart)
        except BaseException:
            if graph is not None and end[0] == cudart.cudaError_t.cudaSuccess:
                cudart.cudaGraphDestroy(graph)
            raise
        return cls(graph, exec_, cudart)

    def launch(self, stream: int) -> None:
        if self._exec is None:
            raise RuntimeError("this CUDA graph was closed")
        check(self._cudart.cudaGraphLaunch(self._exec, stream), "cudaGraphLaunch", self._cudart)

    def close(self) -> None:
        """Destroy the executable graph, then the graph (idempotent; errors are raised, once)."""
        exec_, graph, self._exec, self._graph = self._exec, self._graph, None, None
        if exec_ is not None:
            check(self._cudart.cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy", self._cudart)
        if graph is not None:
            check(self._cudart.cudaGraphDestroy(graph), "cudaGraphDestroy", self._cudart)

    @property
    def closed(self) -> bool:
        return self._exec is None


def unavailable_reason() -> str | None:
    """None when cuda-python imports and sees a CUDA device, else why not (one line)."""
    try:
        cudart = import_cudart()
    except ImportError as e:
        return str(e)
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        return f"cuda-python sees no usable CUDA device ({error_name(cudart, err)})"
    if count < 1:
        return "cuda-python sees no CUDA device"
    return None
