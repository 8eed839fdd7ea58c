"""The serving leg of ``make demo``: portable repository -> tritonserver -> text queries over HTTP.

:func:`demo_search` builds the portable repository for an export directory (with a gallery index
directory, built here with the default ``exact`` engine when given a ``.npz`` of pairs), serves it with the bundled
tritonserver on loopback, sends each text query through ``text_to_audio_search`` over HTTP, and
returns ids, scores and per-request latency. The server is always stopped before it returns.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .repository import SEARCH_ENSEMBLE, SEARCH_IDS, SEARCH_SCORES, SEED, TEXT, build_repository
from .server import TritonServer

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """``ids[q]``/``scores[q]``: the top-k gallery ids and fused scores of query q, best first;
    ``latency_ms[q]``: client-side round trip of its HTTP request (one query per request)."""

    queries: list[str]
    ids: list[list[str]]
    scores: list[list[float]]
    latency_ms: list[float]
    repository: str
    http_url: str
    startup_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table for the demo's output."""
        lines = []
        for q, ids, sc, ms in zip(self.queries, self.ids, self.scores, self.latency_ms):
            lines.append(f"{q!r}  ({ms:.1f} ms)")
            lines += [f"    {i + 1}. {a:<24} {s:+.4f}" for i, (a, s) in enumerate(zip(ids, sc))]
        lat = np.asarray(self.latency_ms)
        lines.append(
            f"{len(lat)} requests over HTTP to {self.http_url}: p50 {np.percentile(lat, 50):.1f} ms, "
            f"p90 {np.percentile(lat, 90):.1f} ms, max {lat.max():.1f} ms (server ready in {self.startup_s:.1f} s, "
            f"first warm-up request {self.extra.get('warmup_ms', float('nan')):.1f} ms)"
        )
        return "\n".join(lines)


def _index_from(export_dir: Path, index_or_pairs: str | os.PathLike, work: Path) -> Path:
    """An index directory as given, or one built (default engine) from a paired-embedding ``.npz``
    (gallery = its audio)."""
    path = Path(index_or_pairs)
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a gallery index directory (`diffgap index`) or a pairs .npz")
    from diffgap.core.data import load_pairs
    from diffgap.runtime import build_index

    pairs = load_pairs(path, require=("audio",))
    return build_index(export_dir, work / "index", audio=pairs["audio"], ids=pairs.ids)


def demo_search(
    export_dir: str | os.PathLike,
    index_or_pairs: str | os.PathLike,
    queries: Sequence[str],
    *,
    k: int = 5,
    seed: int | None = None,
    work_dir: str | os.PathLike | None = None,
) -> DemoResult:
    """Serve ``export_dir`` with Triton and answer ``queries`` through ``text_to_audio_search`` over HTTP.

    ``work_dir`` keeps the generated repository (and index) there; by default a temporary directory
    is used and removed. ``seed``: the per-request sampler seed (default: the repository's).
    """
    import tritonclient.http as httpclient

    if not queries or any(not isinstance(q, str) or not q.strip() for q in queries):
        raise ValueError("queries must be a non-empty list of non-empty strings")
    export_dir = Path(export_dir)
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="diffgap-demo-triton-")
        work = Path(tmp.name)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        index = _index_from(export_dir, index_or_pairs, work)
        repo = build_repository(export_dir, work / "triton_repo", overwrite=True, flavor="portable", index=index, top_k=k)
        t0 = time.perf_counter()
        with TritonServer(repo) as server:
            startup = time.perf_counter() - t0
            client = server.http_client()
            ids, scores, lat = [], [], []
            warm = None
            for n, q in enumerate([queries[0], *queries]):
                inp = [httpclient.InferInput(TEXT, [1, 1], "BYTES")]
                inp[0].set_data_from_numpy(np.array([[q.encode("utf-8")]], dtype=object))
                if seed is not None:
                    s = httpclient.InferInput(SEED, [1, 1], "INT64")
                    s.set_data_from_numpy(np.array([[seed]], dtype=np.int64))
                    inp.append(s)
                outs = [httpclient.InferRequestedOutput(SEARCH_IDS), httpclient.InferRequestedOutput(SEARCH_SCORES)]
                t = time.perf_counter()
                r = client.infer(SEARCH_ENSEMBLE, inp, outputs=outs)
                ms = (time.perf_counter() - t) * 1e3
                if n == 0:  # the first request pays for lazy allocations in every model: reported apart
                    warm = ms
                    continue
                lat.append(ms)
                ids.append([x.decode("utf-8") for x in r.as_numpy(SEARCH_IDS)[0]])
                scores.append([float(x) for x in r.as_numpy(SEARCH_SCORES)[0]])
            url = server.http_url
        return DemoResult(list(queries), ids, scores, lat, str(repo), url, startup, extra={"warmup_ms": warm})
    finally:
        if tmp is not None:
            tmp.cleanup()
