"""The host side of TensorRT engines: versions, lazy imports, GPU identity, the current device.

A serialized TensorRT engine is tied to the TensorRT release that built it (deserialising it in
another release fails with "Version tag does not match"), to the GPU model and compute capability,
and it is built on whichever CUDA device is *current* when the builder runs. This module holds those
facts for :mod:`diffgap.runtime.engine` (building, the cache), :mod:`diffgap.runtime.trt_session`
(running) and the Triton repository (checking an engine against the serving release's TensorRT).

tensorrt and pycuda are imported lazily; everything except :meth:`HostInfo.current` and
:func:`device_context` is pure python.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from diffgap.core.errors import BackendUnavailable, MissingDependency, UserError

log = logging.getLogger(__name__)

MIN_TRT = (10, 12)          # first release with the strongly-typed flow we rely on (weak typing deprecated in 10.12)

# How to read a tritonserver image's TensorRT version (each release bundles one; its release notes
# list it too). The engines of the gpu flavour must be built by that same TensorRT release.
SERVER_TRT_HINT = (
    "read it from the image: `docker run --rm nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
    "sh -c 'dpkg -l | grep nvinfer'` (or the \"TensorRT\" row of that release's notes)"
)


# ----------------------------------------------------------------------------------------------
# versions and lazy imports
# ----------------------------------------------------------------------------------------------
def parse_version(v: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> ``(10, 13, 0, 35)``; trailing non-numeric parts (``"11.0.0rc1"``) are dropped."""
    parts: list[int] = []
    for p in str(v).split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
        if m.group() != p:
            break
    if not parts:
        raise ValueError(f"cannot parse version {v!r}")
    return tuple(parts)


def check_trt_version(v: str) -> tuple[int, ...]:
    ver = parse_version(v)
    if ver[:2] < MIN_TRT:
        raise BackendUnavailable(
            f"TensorRT {v} is too old: diffgap builds strongly typed FP16 engines, which needs TensorRT "
            f">= {MIN_TRT[0]}.{MIN_TRT[1]}; `pip install 'tensorrt>=10.12'`"
        )
    return ver


def needs_strongly_typed_flag(v: str) -> bool:
    """True on 10.12+ (strong typing is opt-in), False on 11+ (always strongly typed, flag ignored)."""
    return check_trt_version(v)[0] < 11


def network_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network on the installed TensorRT."""
    if not needs_strongly_typed_flag(trt.__version__):
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependency(
            "backend 'tensorrt' needs the tensorrt package (GPU hosts only): `pip install -e .[gpu]`"
        ) from e
    check_trt_version(trt.__version__)
    return trt


def import_pycuda() -> Any:
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise MissingDependency("backend 'tensorrt' needs pycuda (GPU hosts only): `pip install -e .[gpu]`") from e
    return cuda


_LOGGER: Any = None


def trt_logger() -> Any:
    """One process-wide TensorRT logger (TensorRT expects a single ILogger per process)."""
    global _LOGGER
    if _LOGGER is None:
        trt = import_tensorrt()
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


# ----------------------------------------------------------------------------------------------
# host identity and the cache key
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostInfo:
    """What a serialized engine is tied to: TensorRT version, GPU model, compute capability."""

    trt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    @classmethod
    def current(cls, device: int = 0) -> "HostInfo":
        """TensorRT here and CUDA device ``device``'s name and compute capability."""
        trt = import_tensorrt()
        cuda = import_pycuda()
        try:
            dev = _device(cuda, device)
            major, minor = dev.compute_capability()
            return cls(trt_version=trt.__version__, gpu_name=dev.name(), compute_capability=f"{major}.{minor}")
        except cuda.Error as e:
            raise BackendUnavailable(f"CUDA is not usable on this machine ({e}); TensorRT engines need an NVIDIA GPU") from e

    @property
    def slug(self) -> str:
        """Folder name: ``nvidia-h100-80gb-hbm3_sm90_trt10.13.0.35``."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-") or "gpu"
        cc = self.compute_capability.replace(".", "")
        return f"{gpu}_sm{cc}_trt{self.trt_version}"

    def describe(self) -> str:
        return f"{self.gpu_name} (sm {self.compute_capability}), TensorRT {self.trt_version}"


def check_device_index(device: int) -> int:
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise ValueError(f"device must be a CUDA device index >= 0, got {device!r}")
    return device


def _device(cuda: Any, device: int) -> Any:
    check_device_index(device)
    cuda.init()
    n = cuda.Device.count()
    if device >= n:
        raise BackendUnavailable(f"no CUDA device {device} visible ({n} found; CUDA_VISIBLE_DEVICES renumbers them from 0)")
    return cuda.Device(device)


@contextmanager
def device_context(device: int = 0) -> Iterator[Any]:
    """Make CUDA device ``device`` current for the block (its primary context, pushed and popped).

    TensorRT's builder and runtime work on the *current* device; the CUDA runtime API that they
    (and cuda-python) use adopts the context current on the calling thread, so pushing device N's
    primary context is what puts a build on GPU N.
    """
    cuda = import_pycuda()
    try:
        dev = _device(cuda, device)
        ctx = dev.retain_primary_context()
        ctx.push()
    except cuda.Error as e:
        raise BackendUnavailable(f"CUDA device {device} is not usable ({e})") from e
    try:
        yield dev
    finally:
        cuda.Context.pop()
        ctx.detach()


# ----------------------------------------------------------------------------------------------
# the serving release's TensorRT
# ----------------------------------------------------------------------------------------------
def trt_release(v: str) -> tuple[int, int, int]:
    """``"10.8.0.43-1+cuda12.8"`` (dpkg) or ``"10.8.0.43"`` (python) -> ``(10, 8, 0)``."""
    parts = parse_version(v)
    return tuple((parts + (0, 0, 0))[:3])  # type: ignore[return-value]


FIXES = (
    "build the engines inside that release's container (`diffgap build-engines` there), or ship ONNX "
    "with --gpu-platform onnxruntime_onnx (Triton builds the TensorRT engine at load time)"
)


def server_trt_release(server_trt: str | None) -> tuple[int, int, int]:
    """The serving tritonserver's TensorRT release from ``--server-trt-version``; UserError if absent or unparsable."""
    if not server_trt:
        raise UserError(
            "a tensorrt_plan engine loads only in the TensorRT release that built it: pass --server-trt-version "
            f"with the serving tritonserver's TensorRT ({SERVER_TRT_HINT}), or use --gpu-platform onnxruntime_onnx"
        )
    try:
        return trt_release(server_trt)
    except ValueError as e:
        raise UserError(f"--server-trt-version {server_trt!r} is not a version such as 10.8.0; {SERVER_TRT_HINT}") from e


def check_server_trt(engine_trt: str, server_trt: str | None, what: str) -> None:
    """Refuse an engine whose TensorRT release differs from the serving tritonserver's.

    An engine deserialises only in the release that built it (major.minor.patch), so a mismatch
    would load nothing at server start-up; the message gives both ways out.
    """
    if trt_release(engine_trt) != server_trt_release(server_trt):
        raise UserError(
            f"{what} was built with TensorRT {engine_trt} but the server runs TensorRT {server_trt}: it would not "
            f"load (\"Version tag does not match\"); {FIXES}"
        )
