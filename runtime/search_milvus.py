"""The ``milvus`` engine: the gallery vectors V in a Milvus collection (pymilvus, imported lazily).

One schema everywhere: ``row`` INT64 primary key (the row of the index's arrays) and ``v``
FLOAT_VECTOR (E + 2D), metric IP. ``uri`` names a Milvus server (``http://host:19530``; a token, if
the cluster needs one, comes from the ``MILVUS_TOKEN`` environment variable and is never written to
the index) or, left empty, an embedded Milvus Lite file inside the index directory. ``index_type``
FLAT is exhaustive (its top-k equals the exact engine's); IVF_FLAT (``nlist``, per query ``nprobe``)
and HNSW (``m``, ``ef_construction``, per query ``ef_search``) are approximate. Scores are Milvus's
inner products, so a search reads nothing from V locally.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .gallery import GallerySide, SearchError
from .search_base import Progress, SearchEngine

log = logging.getLogger(__name__)

INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW")
INSERT_ROWS = 2000          # rows per insert call (a 1536-d float row is 6 KB; Milvus caps a message at 64 MB)
MAX_TOPK = 16384            # Milvus's limit on one search's top-k
LOCAL_FILE = "{side}.milvus.db"


def resolve_uri(root: Path, side: str, uri: str) -> str:
    return uri or str((root / LOCAL_FILE.format(side=side)).resolve())


def connect(uri: str) -> Any:
    """A MilvusClient for ``uri``; an unreachable server is a one-line error naming the URI."""
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError as e:
        raise SearchError(f"the milvus engine needs pymilvus ({e}); `pip install 'diffgap[search]'`") from None
    try:
        return MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""), timeout=10)
    except (MilvusException, OSError, ValueError) as e:
        msg = getattr(e, "message", None) or str(e)
        raise SearchError(f"cannot reach Milvus at {uri} ({msg.splitlines()[0][:200]}); start the server or pass another URI") from None


def disconnect(client: Any, uri: str) -> None:
    """Close ``client``; for an embedded (Milvus Lite) file also stop its in-process server, which holds
    a lock on the file until released."""
    client.close()
    if not uri.startswith(("http://", "https://", "tcp://", "unix:")):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


class MilvusEngine(SearchEngine):
    name = "milvus"
    defaults = {"uri": "", "collection": "", "index_type": "FLAT", "nlist": 1024, "m": 16, "ef_construction": 200}
    knobs = {"nprobe": 16, "ef_search": 64}

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        out = super().check_params(params)
        if out["index_type"] not in INDEX_TYPES:
            raise SearchError(f"engine milvus: index_type must be one of {INDEX_TYPES}, got {out['index_type']!r}")
        if out["uri"]:  # an unreachable server is reported before any gallery work is done
            disconnect(connect(out["uri"]), out["uri"])
        return out

    @classmethod
    def build(cls, vectors: np.ndarray, root: Path, side: str, params: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        from pymilvus import DataType, MilvusClient

        params = dict(params)
        if not params["collection"]:
            raise SearchError("engine milvus: name a collection (--param collection=NAME)")
        params["collection"] = f"{params['collection']}_{side}"
        n, d = vectors.shape
        uri = resolve_uri(root, side, params["uri"])
        client = connect(uri)
        try:
            name = params["collection"]
            if client.has_collection(name):
                log.info("milvus: replacing collection %s", name)
                client.drop_collection(name)
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("row", DataType.INT64, is_primary=True)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=d)
            ip = client.prepare_index_params()
            extra = {"IVF_FLAT": {"nlist": int(params["nlist"])},
                     "HNSW": {"M": int(params["m"]), "efConstruction": int(params["ef_construction"])}}.get(params["index_type"], {})
            ip.add_index(field_name="v", index_type=params["index_type"], metric_type="IP", params=extra)
            client.create_collection(name, schema=schema, index_params=ip)
            for a in range(0, n, INSERT_ROWS):
                block = np.asarray(vectors[a:a + INSERT_ROWS], np.float32)
                client.insert(name, [{"row": a + i, "v": r} for i, r in enumerate(block.tolist())])
                if progress:
                    progress(f"{side} milvus", min(n, a + INSERT_ROWS), n)
            client.flush(name)
        finally:
            disconnect(client, uri)
        return params

    def __init__(self, side: GallerySide, params: Mapping[str, Any], *, uri: str | None = None, **options: Any) -> None:
        super().__init__(side, params)
        self.uri = resolve_uri(side.root, side.name, uri if uri is not None else self.params["uri"])
        self.collection = self.params["collection"]
        self.client = connect(self.uri)
        if not self.client.has_collection(self.collection):
            disconnect(self.client, self.uri)
            raise SearchError(f"Milvus at {self.uri} has no collection {self.collection}; rebuild the index with --engine milvus against it")
        rows = int(self.client.get_collection_stats(self.collection).get("row_count", -1))
        if rows != side.count:
            disconnect(self.client, self.uri)
            raise SearchError(f"Milvus collection {self.collection} at {self.uri} holds {rows} rows, the index {side.count}; rebuild the index")
        self.client.load_collection(self.collection)

    def search(self, u: np.ndarray, k: int, **knobs: Any) -> tuple[np.ndarray, np.ndarray]:
        kn = self.knob_values(knobs)
        if k > MAX_TOPK:
            raise SearchError(f"k={k} exceeds Milvus's top-k limit of {MAX_TOPK}; ask for fewer results")
        sp = {"metric_type": "IP", "params": {"nprobe": int(kn["nprobe"]), "ef": max(int(kn["ef_search"]), k)}}
        res = self.client.search(self.collection, data=np.asarray(u, np.float32).tolist(), limit=k, anns_field="v",
                                 search_params=sp, output_fields=["row"])
        rows = np.full((len(u), k), -1, np.int64)
        scores = np.full((len(u), k), -np.inf, np.float32)
        for b, hits in enumerate(res):
            pairs = sorted(((float(h["distance"]), int(h["row"])) for h in hits), key=lambda t: (-t[0], t[1]))
            for j, (s, r) in enumerate(pairs[:k]):
                rows[b, j], scores[b, j] = r, s
        if (rows < 0).any():
            raise SearchError(f"Milvus returned fewer than k={k} results from {self.collection}; raise nprobe/ef_search")
        return rows, scores

    def close(self) -> None:
        disconnect(self.client, self.uri)
