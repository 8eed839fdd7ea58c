"""Make the GPU libraries that pip installs loadable by onnxruntime, without the caller's LD_LIBRARY_PATH.

pip puts the CUDA / cuDNN / TensorRT shared libraries inside site-packages, where the dynamic loader
does not look:

- onnxruntime-gpu's ``[cuda,cudnn]`` extras install the CUDA and cuDNN wheels (``nvidia-*``), and
  onnxruntime finds them only after ``onnxruntime.preload_dlls()`` (onnxruntime >= 1.21) has loaded
  them by path;
- TensorRT's ``tensorrt_libs`` package holds ``libnvinfer.so.N`` & co. onnxruntime's TensorRT provider
  library (``libonnxruntime_providers_tensorrt.so``, loaded when a session asks for that provider)
  names them by soname only. Loading them first, by path, with ``RTLD_GLOBAL`` lets the loader
  resolve those names to the copies already in the process (glibc matches a needed soname against
  the libraries already loaded before searching any path).

:func:`prepare_onnxruntime` does both, once per process, and is called by
:class:`~diffgap.runtime.session.OrtSession` before it creates an ``ort-cuda`` / ``ort-trt`` session:
``open_model``, the CLI and the tests all go through it. A system install (TensorRT from the CUDA
repositories, NGC containers) has no ``tensorrt_libs`` package and needs nothing here.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import logging
import threading
from pathlib import Path
from typing import Any

from diffgap.core.errors import BackendUnavailable

log = logging.getLogger(__name__)

# Preload order: each library before those that need it (TensorRT's own Windows loader uses the same
# order: nvinfer, nvinfer_plugin, nvonnxparser). The builder resource and lean/dispatch runtimes are
# opened by libnvinfer itself when needed, from its own folder.
TRT_LIBS_ORDER = ("libnvinfer.so", "libnvinfer_plugin.so", "libnvonnxparser.so")
TRT_LIBS_PACKAGE = "tensorrt_libs"

_lock = threading.Lock()
_done: dict[str, Any] = {}


def tensorrt_libs_dir(package: str = TRT_LIBS_PACKAGE) -> Path | None:
    """The folder of pip's TensorRT libraries (the ``tensorrt_libs`` package), found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def preload_tensorrt_libs(package: str = TRT_LIBS_PACKAGE) -> list[Path]:
    """Load pip's TensorRT libraries by path with ``RTLD_GLOBAL``; returns what was loaded (once per process).

    Nothing to do (``[]``) without the package. A package without ``libnvinfer`` is a broken install
    and raises :class:`~diffgap.core.errors.BackendUnavailable` (a ``RuntimeError``); so does a library
    that fails to load (``OSError`` from the loader).
    """
    with _lock:
        key = f"trt:{package}"
        if key in _done:
            return _done[key]
        folder = tensorrt_libs_dir(package)
        loaded: list[Path] = []
        if folder is not None:
            for stem in TRT_LIBS_ORDER:
                found = sorted(folder.glob(f"{stem}.*"), key=lambda p: len(p.name))
                if not found:
                    if stem == TRT_LIBS_ORDER[0]:
                        raise BackendUnavailable(f"{folder} (pip's {package}) has no {stem}.*: reinstall TensorRT (`pip install -e .[gpu]`)")
                    continue
                try:
                    ctypes.CDLL(str(found[0]), mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    raise BackendUnavailable(f"could not load {found[0]} ({e}); check the NVIDIA driver and that one CUDA major is installed") from e
                loaded.append(found[0])
            log.debug("preloaded TensorRT libraries %s", [p.name for p in loaded])
        _done[key] = loaded
        return loaded


def preload_onnxruntime_dlls(ort: Any) -> str:
    """``ort.preload_dlls()`` (onnxruntime >= 1.21) once; what it printed comes back (and goes to the log)."""
    with _lock:
        if "ort" in _done:
            return _done["ort"]
        said = ""
        if hasattr(ort, "preload_dlls"):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):  # it reports failures with print()
                ort.preload_dlls()
            said = buf.getvalue().strip()
            if said:
                log.warning("onnxruntime.preload_dlls(): %s", " ".join(said.split()))
        else:
            log.debug("onnxruntime %s has no preload_dlls(); relying on the loader's search path", getattr(ort, "__version__", "?"))
        _done["ort"] = said
        return said


def prepare_onnxruntime(ort: Any, backend: str) -> None:
    """Everything an ``ort-cuda`` / ``ort-trt`` session needs loaded before onnxruntime creates it."""
    if backend in ("ort-cuda", "ort-trt"):
        preload_onnxruntime_dlls(ort)  # the CUDA runtime and cuDNN first: TensorRT runs on them
    if backend == "ort-trt":
        preload_tensorrt_libs()  # before onnxruntime dlopens its TensorRT provider library
