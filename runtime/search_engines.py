"""Maximum-inner-product engines over an index's gallery vectors V, behind one small interface.

The fused score is ``U(q) . V(g) + offset(q)`` (:mod:`diffgap.runtime.fusion`), so serving a gallery is
top-k inner-product search. Every engine answers ``search(U, k, **knobs) -> (rows (B, k), U.V (B, k))``:

- ``exact`` (default): one float32 matrix product over the memory-mapped V (sgemv at B = 1, sgemm
  above) and a partial selection; it reads V once per call, so it runs near the memory bandwidth bound.
- ``faiss-hnsw``: a FAISS HNSW graph (``m``, ``ef_construction``; per query ``ef_search``), storing
  vectors as ``flat`` float32, ``fp16`` or ``sq8`` (8-bit scalar quantisation, 4x smaller).
- ``faiss-ivf``: a FAISS inverted file (``nlist`` k-means lists; per query ``nprobe``) storing
  ``flat``, ``fp16``, ``sq8`` or ``pq`` (product quantisation, ``pq_m`` bytes per vector).
- ``milvus`` (:mod:`.search_milvus`): a Milvus collection, on a server URI or embedded (Milvus Lite).

Approximate engines take ``refine`` (per query): they fetch ``refine x k`` candidates and rescore them
exactly from V, so the scores they return are exact fused scores and compressed storage loses rank
only where the true top-k never reached the candidates. FAISS is imported only by its engines.
"""
from __future__ import annotations

import abc
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from .fusion import top_k
from .gallery import GallerySide, SearchError
from .search_base import Progress, SearchEngine, int_param

log = logging.getLogger(__name__)

ADD_CHUNK = 65536   # rows per FAISS add() call: bounded memory while building from the memory-mapped V


class RowReader:
    """Rows of the vectors file read with ``os.pread``: rescoring touches a few scattered rows per
    query, and reading them through the memory map would map ~64 KB of cached neighbours per page
    fault (the kernel's fault-around), resident memory the engine never uses."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors
        path = getattr(vectors, "filename", None)
        self.fd = os.open(path, os.O_RDONLY) if path is not None else None
        self.offset = int(getattr(vectors, "offset", 0))
        self.row_bytes = vectors.shape[1] * vectors.dtype.itemsize

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        if self.fd is None:
            return np.asarray(self.vectors[rows])
        out = np.empty((len(rows), self.vectors.shape[1]), self.vectors.dtype)
        for i, r in enumerate(rows.tolist()):
            out[i] = np.frombuffer(os.pread(self.fd, self.row_bytes, self.offset + r * self.row_bytes), self.vectors.dtype)
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ExactEngine(SearchEngine):
    """One matrix product over every gallery vector; the reference the others are measured against."""

    name = "exact"

    def search(self, u: np.ndarray, k: int, **knobs: Any) -> tuple[np.ndarray, np.ndarray]:
        self.knob_values(knobs)
        v = self.side.vectors
        s = (v @ u[0])[None, :] if u.shape[0] == 1 else u @ v.T   # sgemv / sgemm straight off the mapped file
        return top_k(s, k)


class _FaissEngine(SearchEngine):
    """Shared FAISS plumbing: factory string, chunked add from V, per-query SearchParameters."""

    storages: ClassVar[tuple[str, ...]] = ()
    _codes = {"flat": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}

    @staticmethod
    def _faiss() -> Any:
        try:
            import faiss
        except ImportError as e:
            raise SearchError(f"the FAISS engines need faiss-cpu ({e}); `pip install 'diffgap[search]'`") from None
        return faiss

    @classmethod
    @abc.abstractmethod
    def _factory(cls, params: dict[str, Any], n: int, d: int) -> str:
        """The FAISS index-factory string for ``n`` vectors of width ``d``."""

    @classmethod
    def file_name(cls, side: str) -> str:
        return f"{side}.{cls.name}.faiss"

    @classmethod
    def files(cls, side: str) -> dict[str, str]:
        return {"engine": cls.file_name(side)}

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_params(params)
        if out["storage"] not in cls.storages:
            raise SearchError(f"engine {cls.name}: storage must be one of {cls.storages}, got {out['storage']!r}")
        cls._faiss()  # a missing faiss-cpu is reported before any work is done
        return out

    @classmethod
    def build(cls, vectors: np.ndarray, root: Path, side: str, params: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        faiss = cls._faiss()
        n, d = vectors.shape
        params = dict(params)
        spec = cls._factory(params, n, d)
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        cls._configure(faiss, index, params)
        if not index.is_trained:
            m = min(n, int_param(params, "train_size"))
            rows = np.sort(np.random.default_rng(0).choice(n, m, replace=False))
            log.info("%s: training %s on %d of %d vectors", cls.name, spec, m, n)
            index.train(np.ascontiguousarray(vectors[rows], np.float32))
        for a in range(0, n, ADD_CHUNK):
            index.add(np.ascontiguousarray(vectors[a:a + ADD_CHUNK], np.float32))
            if progress:
                progress(f"{side} {cls.name}", min(n, a + ADD_CHUNK), n)
        f = root / cls.file_name(side)
        faiss.write_index(index, str(f))
        params["factory"] = spec
        return params

    @classmethod
    def _configure(cls, faiss: Any, index: Any, params: dict[str, Any]) -> None:
        pass

    def __init__(self, side: GallerySide, params: Mapping[str, Any], **options: Any) -> None:
        super().__init__(side, params)
        self.rows = RowReader(side.vectors)
        faiss = self._faiss()
        f = side.root / self.file_name(side.name)
        try:
            self.index = faiss.read_index(str(f))
        except RuntimeError as e:
            raise SearchError(f"FAISS index {f} is unreadable ({str(e).strip().splitlines()[-1][:200]}); rebuild the index") from None
        if self.index.ntotal != side.count or self.index.d != side.vectors.shape[1]:
            raise SearchError(f"FAISS index {f} holds {self.index.ntotal} x {self.index.d}, expected {side.count} x "
                              f"{side.vectors.shape[1]}; rebuild the index")

    @abc.abstractmethod
    def _search_params(self, faiss: Any, kn: dict[str, Any], want: int) -> Any:
        """FAISS SearchParameters for one call (per-query knobs ``kn``, ``want`` candidates)."""

    def search(self, u: np.ndarray, k: int, **knobs: Any) -> tuple[np.ndarray, np.ndarray]:
        kn = self.knob_values(knobs)
        faiss = self._faiss()
        want = min(self.side.count, k * kn["refine"])
        _, cand = self.index.search(np.ascontiguousarray(u, np.float32), want, params=self._search_params(faiss, kn, want))
        return self.rescore(u, cand, k)

    def close(self) -> None:
        self.rows.close()


class FaissHnswEngine(_FaissEngine):
    name = "faiss-hnsw"
    storages = ("flat", "fp16", "sq8")
    defaults = {"m": 32, "ef_construction": 80, "storage": "flat", "train_size": 100_000}
    knobs = {"ef_search": 64, "refine": 1}

    @classmethod
    def _factory(cls, params: dict[str, Any], n: int, d: int) -> str:
        return f"HNSW{int_param(params, 'm', 2)},{cls._codes[params['storage']]}"

    @classmethod
    def _configure(cls, faiss: Any, index: Any, params: dict[str, Any]) -> None:
        faiss.downcast_index(index).hnsw.efConstruction = int_param(params, "ef_construction")

    def _search_params(self, faiss: Any, kn: dict[str, Any], want: int) -> Any:
        return faiss.SearchParametersHNSW(efSearch=max(int(kn["ef_search"]), want))  # fewer than k would come back


class FaissIvfEngine(_FaissEngine):
    name = "faiss-ivf"
    storages = ("flat", "fp16", "sq8", "pq")
    defaults = {"nlist": 0, "storage": "flat", "pq_m": 0, "train_size": 0, "kmeans_iters": 10}
    knobs = {"nprobe": 16, "refine": 1}

    @classmethod
    def _factory(cls, params: dict[str, Any], n: int, d: int) -> str:
        # nlist ~ sqrt(N), trained on 40 points per list (FAISS warns below 39): at 1M x 1536 the
        # k-means then costs ~1e12 FLOPs, minutes at most on a few cores (4 sqrt(N) lists cost 16x more).
        nlist = int(params["nlist"]) or max(1, min(int(math.sqrt(n)), n // 40))
        params["nlist"] = int_param({"nlist": nlist}, "nlist")
        params["train_size"] = int(params["train_size"]) or min(n, max(40 * nlist, 10_000))
        if params["storage"] != "pq":
            return f"IVF{nlist},{cls._codes[params['storage']]}"
        m = int(params["pq_m"]) or max(1, d // 16)
        if d % m:
            raise SearchError(f"engine {cls.name}: pq_m={m} must divide the vector dim {d}")
        params["pq_m"] = m
        params["train_size"] = max(params["train_size"], min(n, 10_000))
        return f"IVF{nlist},PQ{m}"

    @classmethod
    def _configure(cls, faiss: Any, index: Any, params: dict[str, Any]) -> None:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.niter = int_param(params, "kmeans_iters")
        if hasattr(ivf, "pq"):  # the product quantiser's own k-means (FAISS default 25 iterations)
            ivf.pq.cp.niter = ivf.cp.niter

    def _search_params(self, faiss: Any, kn: dict[str, Any], want: int) -> Any:
        return faiss.SearchParametersIVF(nprobe=int(kn["nprobe"]))


def _milvus() -> type[SearchEngine]:
    from .search_milvus import MilvusEngine

    return MilvusEngine


ENGINES: dict[str, Callable[[], type[SearchEngine]]] = {
    "exact": lambda: ExactEngine,
    "faiss-hnsw": lambda: FaissHnswEngine,
    "faiss-ivf": lambda: FaissIvfEngine,
    "milvus": _milvus,
}
DEFAULT_ENGINE = "exact"
KNOBS = ("ef_search", "nprobe", "refine")   # every per-query setting any engine takes (CLI flags, Triton parameters)


def engine_class(name: str) -> type[SearchEngine]:
    if name not in ENGINES:
        raise SearchError(f"unknown search engine {name!r}; use one of {', '.join(ENGINES)}")
    return ENGINES[name]()


def open_engine(side: GallerySide, name: str, **options: Any) -> SearchEngine:
    """Engine ``name`` opened over ``side`` with the parameters its build recorded."""
    return engine_class(name)(side, side.info.get("engine_params", {}), **options)
