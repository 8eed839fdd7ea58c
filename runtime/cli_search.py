"""``diffgap search "a dog barks" --index INDEX [--export DIR] -k 5``: query a gallery index with the
engine it was built with (per-query settings as flags)."""
from __future__ import annotations

import argparse
import json

from diffgap.core.names import BACKENDS, PRECISIONS

HELP = "search a gallery index with text (-> audio ids) or with audio files (--audio, -> captions)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("queries", nargs="*", metavar="TEXT", help="text queries (one search per argument)")
    p.add_argument("--audio", nargs="+", metavar="FILE", help="audio-file queries, answered with the index's captions")
    p.add_argument("--index", required=True, metavar="INDEX", help="index directory written by `diffgap index`")
    p.add_argument("--export", metavar="DIR", help="export directory (default: the one the index was built from)")
    p.add_argument("-k", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--backend", default="ort-cpu", choices=BACKENDS)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--seed", type=int, default=0, help="sampler noise seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--ef-search", type=int, default=None, help="faiss-hnsw / milvus HNSW: candidates explored per query")
    p.add_argument("--nprobe", type=int, default=None, help="faiss-ivf / milvus IVF_FLAT: inverted lists scanned per query")
    p.add_argument("--refine", type=int, default=None, help="FAISS engines: rescore refine x k candidates exactly")
    p.add_argument("--milvus-uri", default=None, metavar="URI", help="milvus engine: search this server instead of the recorded one")


def run(args: argparse.Namespace) -> int:
    from diffgap.core.errors import UserError

    from .gallery import GalleryIndex
    from .search import AudioSearch

    if not args.queries and not args.audio:
        raise UserError("give at least one text query or --audio FILE")
    if args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}")
    index = GalleryIndex.load(args.index)
    export = args.export or index.meta.get("export_dir")
    if not export:
        raise UserError("the index records no export directory; pass --export DIR")
    results = []
    search = AudioSearch(index, export, args.backend, args.precision, seed=args.seed,
                         engine_options={} if args.milvus_uri is None else {"uri": args.milvus_uri})
    knobs = {"ef_search": args.ef_search, "nprobe": args.nprobe, "refine": args.refine}
    with search as s:
        if args.queries:
            ids, scores = s.search(args.queries, k=args.k, **knobs)
            for q, i, sc in zip(args.queries, ids, scores):
                results.append({"query": q, "results": [{"id": str(a), "score": float(b)} for a, b in zip(i, sc)]})
        if args.audio:
            cids, caps, scores = s.search_captions(args.audio, k=args.k, **knobs)
            for q, i, c, sc in zip(args.audio, cids, caps, scores):
                results.append({"query": q, "results": [{"id": str(a), "caption": str(b), "score": float(d)} for a, b, d in zip(i, c, sc)]})
    if args.json:
        print(json.dumps({"index": args.index, "engine": index.engine["name"], "k": args.k, "queries": results}, indent=2))
        return 0
    for r in results:
        print(f"query: {r['query']}")
        for rank, hit in enumerate(r["results"], start=1):
            extra = f"  {hit['caption']}" if "caption" in hit else ""
            print(f"  {rank:2d}. {hit['score']:+.4f}  {hit['id']}{extra}")
    return 0
