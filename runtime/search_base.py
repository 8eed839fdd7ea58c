"""The interface every search engine implements (:class:`SearchEngine`), and the parameter check they share.

Its own module so that each engine module (:mod:`.search_engines` for exact and FAISS,
:mod:`.search_milvus` for Milvus) imports the interface, and the registry in :mod:`.search_engines`
imports the engines, without an import circle.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from .fusion import top_k
from .gallery import GallerySide, SearchError

Progress = Callable[[str, int, int], None]


def int_param(params: Mapping[str, Any], key: str, lo: int = 1) -> int:
    try:
        v = int(params[key])
    except (TypeError, ValueError):
        raise SearchError(f"engine parameter {key} must be an integer, got {params[key]!r}") from None
    if v < lo:
        raise SearchError(f"engine parameter {key} must be >= {lo}, got {v}")
    return v


class SearchEngine(abc.ABC):
    """One side of an index, searchable. Subclasses set ``name``, ``defaults`` (build parameters) and
    ``knobs`` (per-query settings with their defaults)."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    knobs: ClassVar[dict[str, Any]] = {}

    def __init__(self, side: GallerySide, params: Mapping[str, Any], **options: Any) -> None:
        self.side, self.params = side, dict(params)

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Build parameters with defaults filled in; unknown keys are a one-line error."""
        allowed = set(cls.defaults) | set(cls.knobs)
        bad = sorted(set(params) - allowed)
        if bad:
            raise SearchError(f"engine {cls.name} has no parameter(s) {bad}; use {sorted(allowed) or 'none'}")
        return {**cls.defaults, **cls.knobs, **params}

    @classmethod
    def build(cls, vectors: np.ndarray, root: Path, side: str, params: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """Build over ``vectors`` (N, d) into the index directory ``root``; returns the parameters to record."""
        return params

    @classmethod
    def files(cls, side: str) -> dict[str, str]:
        """Files the engine adds to the index directory for ``side`` (checked like the arrays)."""
        return {}

    def knob_values(self, knobs: Mapping[str, Any]) -> dict[str, Any]:
        bad = sorted(k for k, v in knobs.items() if v is not None and k not in self.knobs)
        if bad:
            raise SearchError(f"engine {self.name} takes no per-query setting(s) {bad}; use {sorted(self.knobs) or 'none'}")
        out = {k: self.params.get(k, d) for k, d in self.knobs.items()}
        out.update({k: v for k, v in knobs.items() if v is not None})
        for k, v in out.items():
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise SearchError(f"{k} must be a positive integer, got {v!r}")
        return out

    @abc.abstractmethod
    def search(self, u: np.ndarray, k: int, **knobs: Any) -> tuple[np.ndarray, np.ndarray]:
        """``u (B, d)`` float32 -> (rows (B, k) int64, inner products (B, k) float32), best first."""

    def rescore(self, u: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact U.V of candidate rows (B, c) (-1 = none) from the memory-mapped V; the best k, best first.
        Candidates are put in row order first, so ties go to the lower row as in the exact engine."""
        missing = cand < 0
        cand = np.sort(np.where(missing, np.iinfo(np.int64).max, cand), axis=1)
        missing = cand == np.iinfo(np.int64).max
        if (missing.sum(axis=1) > cand.shape[1] - k).any():
            raise SearchError(f"engine {self.name} found fewer than k={k} results; raise ef_search/nprobe or refine")
        safe = np.where(missing, 0, cand)
        rows = getattr(self, "rows", None)
        vecs = (rows[safe.ravel()] if rows is not None else np.asarray(self.side.vectors[safe.ravel()])).reshape(*safe.shape, -1)
        s = np.einsum("bcd,bd->bc", vecs, u)
        s[missing] = -np.inf
        idx, scores = top_k(s, k)
        return np.take_along_axis(cand, idx, axis=1), scores.astype(np.float32)

    def close(self) -> None:
        pass
