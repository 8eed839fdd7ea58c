"""The one inference interface every backend implements: ``load -> infer(dict) -> dict``.

:class:`Session` (IOSpec checks before and after running), the backend and precision names, and
:func:`check_backend`. Both :mod:`diffgap.runtime.session` (onnxruntime, the factories) and
:mod:`diffgap.runtime.trt_session` (TensorRT) build on this module, which imports neither.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffgap.core.iospec import IOSpec, TensorSpec
from diffgap.core.names import BACKENDS, PRECISIONS  # noqa: F401  (the runtime's names for them)


def check_backend(backend: str, precision: str = "fp32") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


class Session(abc.ABC):
    """The interface every backend implements.

    ``infer(feeds)`` takes ``{input name: ndarray}`` exactly as the IOSpec declares them (optional
    inputs may be omitted) and returns ``{output name: ndarray}`` with the declared dtypes and shapes.
    """

    backend: str = ""

    def __init__(self, io: IOSpec, path: Path, precision: str) -> None:
        self.io = io
        self.path = Path(path)
        self.precision = precision

    # -- metadata ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.io.name

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.io.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.io.outputs

    @property
    def max_batch(self) -> int:
        return self.io.max_batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, backend={self.backend!r}, precision={self.precision!r}, path={str(self.path)!r})"

    # -- running ----------------------------------------------------------------------------
    def prepare_feeds(self, feeds: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Validate ``feeds`` against the IOSpec; return (batch, feeds with optional defaults filled)."""
        batch = self.io.check_feeds(feeds)
        full: dict[str, np.ndarray] = {}
        for t in self.io.inputs:
            if t.name in feeds:
                full[t.name] = np.ascontiguousarray(feeds[t.name])
            else:  # check_feeds only lets optional inputs through missing
                if t.default is None:
                    raise ValueError(f"{self.name}: optional input {t.name!r} has no declared default; pass it explicitly")
                full[t.name] = np.full(t.concrete(batch), t.default, dtype=t.np_dtype)
        return batch, full

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch, full = self.prepare_feeds(feeds)
        out = self._run(full, batch)
        self._check_outputs(out, batch)
        return out

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """Run validated, complete feeds; return every declared output."""

    def _check_outputs(self, out: Mapping[str, np.ndarray], batch: int) -> None:
        for t in self.io.outputs:
            y = out.get(t.name)
            if y is None:
                raise RuntimeError(f"{self.name} ({self.backend}): model produced no output {t.name!r}; the file does not match its I/O declaration")
            if y.dtype != t.np_dtype or tuple(y.shape) != t.concrete(batch):
                raise RuntimeError(
                    f"{self.name} ({self.backend}): output {t.name!r} is {y.dtype}{list(y.shape)}, declared "
                    f"{t.dtype}{list(t.concrete(batch))}; the file does not match its I/O declaration, re-export"
                )

    def close(self) -> None:
        """Release backend resources (idempotent)."""

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
