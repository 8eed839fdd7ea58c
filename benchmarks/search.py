"""The ``search`` group: gallery search engines on synthetic gallery vectors, and AudioSearch end to end.

Engine level: clustered unit vectors of the clap-512 gallery-vector width (E + 2D = 1536; random
uniform vectors have no near neighbours, so they would make every approximate engine look broken)
written to a memory-mapped file exactly as an index stores them, queries near gallery items. Per N
and engine: build time, bytes on disk (vectors + engine), resident memory (RSS growth of a fresh
process: anonymous + mapped file pages), p50/p99 latency at B = 1 and B = 16, queries/s, recall@10 against ``exact``. For ``exact``
the roofline bound of one pass over V (bytes / DRAM bandwidth probed in this group, or FLOPs / peak)
and the achieved fraction. End to end: ``AudioSearch.search`` (tokenizer, text encoder, sampler,
engine) over a 100k-item index of the run's export.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .roofline import bound, measure_bandwidth_gbs

log = logging.getLogger("benchmarks")

DIM = 1536                         # clap-512: E + 2D
K = 10
BATCHES = (1, 16)
FULL_SIZES = (10_000, 100_000, 200_000, 1_000_000)   # 200k: the exact engine's bandwidth goal
QUICK_SIZES = (1_000, 4_000)
E2E_SIZE, E2E_SIZE_QUICK = 100_000, 1_000
QUERIES = 256                      # query pool: recall is averaged over it, latency cycles through it
# (label, engine, build params, per-query knobs, largest N it is built at: HNSW builds are slow on few cores)
CONFIGS: list[tuple[str, str, dict[str, Any], dict[str, Any], int]] = [
    ("exact", "exact", {}, {}, 10**9),
    ("hnsw32 ef64", "faiss-hnsw", {"m": 32, "ef_construction": 64}, {"ef_search": 64}, 100_000),
    ("hnsw32-sq8 ef64 refine4", "faiss-hnsw", {"m": 32, "ef_construction": 64, "storage": "sq8"}, {"ef_search": 64, "refine": 4}, 100_000),
    ("ivf-sq8 nprobe16 refine2", "faiss-ivf", {"storage": "sq8"}, {"nprobe": 16, "refine": 2}, 10**9),
    ("ivf nprobe16", "faiss-ivf", {}, {"nprobe": 16}, 200_000),
    ("milvus-lite FLAT", "milvus", {"index_type": "FLAT"}, {}, 10_000),
]


_RESIDENT = """
import json, sys, numpy as np, psutil
from pathlib import Path
from diffgap.runtime.search_engines import engine_class
from benchmarks.search import _side
a = json.loads(sys.argv[1])
root = Path(a["root"])
v = np.load(root / "audio_vectors.npy", mmap_mode="r")
q = np.load(root / "queries.npy")
cls = engine_class(a["engine"])
side = _side(root, v)
side.info["engine_params"] = a["params"]
def rss():
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile")))
    return {k: int(v.split()[0]) / 1024 for k, v in f.items()}
for mod in ("faiss", "pymilvus"):  # their shared libraries are code, not the engine's data
    try:
        __import__(mod)
    except ImportError:
        pass
r0 = rss()
e = cls(side, a["params"])
for i in range(0, len(q), 16):
    e.search(q[i:i + 16], a["k"], **a["knobs"])
r1 = rss()
print(json.dumps({"anon_mb": r1["RssAnon"] - r0["RssAnon"], "file_mb": r1["RssFile"] - r0["RssFile"]}))
e.close()
"""


def _resident_mb(root: Path, engine: str, params: dict[str, Any], knobs: dict[str, Any]) -> dict[str, float]:
    """RSS growth of a fresh process that opens the engine and runs the query pool (a reused heap in
    this process would hide the engine's memory): anonymous memory (the engine's index) and mapped file
    pages (the vectors it read: all of V for exact, the rescored rows for the others)."""
    import json
    import subprocess
    import sys

    arg = json.dumps({"root": str(root), "engine": engine, "params": params, "knobs": knobs, "k": K})
    out = subprocess.run([sys.executable, "-c", _RESIDENT, arg], capture_output=True, text=True, timeout=1800,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    return {k: round(v, 1) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def synthetic(root: Path, n: int, d: int = DIM, seed: int = 0, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(V (n, d) float32 memory-mapped at root/audio_vectors.npy, queries (QUERIES, d))."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, int(math.sqrt(n))), d)).astype(np.float32) / math.sqrt(d)
    v = np.lib.format.open_memmap(root / "audio_vectors.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for a in range(0, n, chunk):
        m = min(n, a + chunk) - a
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, d), dtype=np.float32) * (0.7 / math.sqrt(d))
        v[a:a + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    v.flush()
    del v
    v = np.load(root / "audio_vectors.npy", mmap_mode="r")
    q = np.asarray(v[np.sort(rng.choice(n, QUERIES, replace=False))]) + rng.standard_normal((QUERIES, d), dtype=np.float32) * (0.4 / math.sqrt(d))
    return v, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _side(root: Path, v: np.ndarray) -> Any:
    from diffgap.runtime.gallery import GallerySide

    n = len(v)
    return GallerySide("audio", root, {"count": n, "dim": v.shape[1], "blocks": [v.shape[1], 0, 0]},
                       np.arange(n).astype(str), v, {})


def _latency(engine: Any, q: np.ndarray, b: int, knobs: dict[str, Any], policy: Any) -> dict[str, float]:
    """p50/p99 per call and queries/s over calls cycling through the query pool."""
    calls = [q[i:i + b] for i in range(0, len(q) - b + 1, b)]
    for c in calls[: max(1, policy.warmup)]:
        engine.search(c, K, **knobs)
    samples: list[float] = []
    t_start = time.perf_counter()
    i = 0
    while True:
        t0 = time.perf_counter()
        engine.search(calls[i % len(calls)], K, **knobs)
        samples.append(time.perf_counter() - t0)
        i += 1
        el = time.perf_counter() - t_start
        if (len(samples) >= 3 and el >= policy.max_time_s) or (len(samples) >= max(policy.repeats, 20) and el >= policy.min_time_s):
            break
    a = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "qps": float(b * len(a) / (a.sum() / 1e3)), "calls": int(a.size)}


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth)]))


def _dir_bytes(root: Path, names: list[str]) -> int:
    return sum((root / n).stat().st_size for n in names if (root / n).exists())


def engine_rows(ctx: Any, n: int, configs: list | None = None, roof: dict[str, float] | None = None) -> list[dict[str, Any]]:
    from diffgap.runtime.search_engines import engine_class

    root = ctx.work / f"search-{n}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    v, q = synthetic(root, n)
    np.save(root / "queries.npy", q)
    log.info("search: %d synthetic gallery vectors (%d-d) in %.1f s", n, v.shape[1], time.perf_counter() - t0)
    side = _side(root, v)
    rows, truth = [], None
    try:
        for label, name, params, knobs, max_n in configs or CONFIGS:
            if n > max_n:
                continue
            cls = engine_class(name)
            row: dict[str, Any] = {"n": n, "dim": v.shape[1], "config": label, "engine": name, "params": params, "knobs": knobs}
            try:
                p = cls.check_params(dict(params))
                if name == "milvus":
                    p["collection"] = f"bench{n}"
                gc.collect()
                t = time.perf_counter()
                recorded = cls.build(v, root, "audio", p)
                row["build_s"] = round(time.perf_counter() - t, 2)
                side.info["engine_params"] = recorded
                engine = cls(side, recorded)
                got = np.concatenate([engine.search(q[i:i + 16], K, **knobs)[0] for i in range(0, len(q), 16)])
                if truth is None:
                    truth = got  # exact runs first: the reference
                row["recall@10"] = _recall(got, truth)
                row["latency"] = {f"B={b}": _latency(engine, q, b, knobs, ctx.policy) for b in BATCHES}
                engine.close()
                del engine
                row.update(_resident_mb(root, name, recorded, knobs))
                row["resident_mb"] = round(row["anon_mb"] + row["file_mb"], 1)
                row["vectors_bytes"] = int(v.nbytes)
                row["engine_bytes"] = _dir_bytes(root, list(cls.files("audio").values())) or (
                    sum(f.stat().st_size for f in root.glob("*.milvus.db/**/*") if f.is_file()) if name == "milvus" else 0)
                if name == "exact" and roof:
                    for b in BATCHES:
                        bd = bound(2.0 * b * n * v.shape[1], float(v.nbytes), roof["peak_gflops"], roof["bandwidth_gbs"])
                        lat = row["latency"][f"B={b}"]
                        lat.update(bound_ms=bd["bound_ms"], bound_by=bd["bound_by"], achieved=bd["bound_ms"] / lat["p50_ms"])
                row["status"] = "ok"
            except Exception as e:  # one engine failing is a recorded result, the others still run
                log.warning("search %s at N=%d failed: %s: %s", label, n, type(e).__name__, e)
                row["status"], row["error"] = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
            log.info("search N=%d %s: %s", n, label, {k: row.get(k) for k in ("build_s", "recall@10", "resident_mb", "status")})
    finally:
        del v, side
        gc.collect()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def end_to_end(ctx: Any, n: int) -> dict[str, Any]:
    """``AudioSearch.search`` (text -> ids) over an ``n``-item exact index built from the run's export."""
    from diffgap.runtime import AudioSearch, build_index

    from .pipeline import captions

    rng = np.random.default_rng(1)
    from diffgap.core.manifest import Manifest

    e = Manifest.load(ctx.main_export).input_dim("audio")
    audio = rng.standard_normal((n, e)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    t = time.perf_counter()
    ix = build_index(ctx.main_export, ctx.work / f"e2e-index-{n}", audio=audio, ids=[f"clip{i:07d}" for i in range(n)])
    out: dict[str, Any] = {"n": n, "build_s": round(time.perf_counter() - t, 1), "latency": {}}
    with AudioSearch(ix, ctx.main_export, intra_op_threads=ctx.threads) as s:
        for b in BATCHES:
            texts = captions(b)

            class _E:  # adapter: the latency loop calls engine.search(q, k)
                @staticmethod
                def search(_q: Any, k: int, **kn: Any) -> Any:
                    return s.search(texts, k=k)

            out["latency"][f"B={b}"] = _latency(_E, np.zeros((QUERIES, 1)), b, {}, ctx.policy)
    shutil.rmtree(ix, ignore_errors=True)
    return out


def run(ctx: Any, sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    sizes = sizes or (QUICK_SIZES if ctx.quick else FULL_SIZES)
    res: dict[str, Any] = {"sizes": list(sizes), "k": K, "dim": DIM, "rows": [], "threads": ctx.threads,
                           "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    # The exact engine's bound: DRAM bandwidth probed here with arrays far past the LLC (the run's
    # --quick roofline uses cache-sized ones), so the bound is the memory the engine actually streams.
    dram = measure_bandwidth_gbs(256 * 2**20, repeats=5, threads=ctx.threads)
    res["bandwidth"] = {**dram, "bandwidth_gbs": max(dram["copy_gbs"], dram["triad_gbs"])}
    ctx_roof = {"peak_gflops": (ctx.roofline or {}).get("peak_gflops", float("inf")), "bandwidth_gbs": res["bandwidth"]["bandwidth_gbs"]}
    for n in sizes:
        res["rows"] += engine_rows(ctx, n, roof=ctx_roof)
    if ctx.main_export is not None:
        try:
            res["end_to_end"] = end_to_end(ctx, E2E_SIZE_QUICK if ctx.quick else E2E_SIZE)
        except Exception as e:
            log.warning("search end to end not measured: %s: %s", type(e).__name__, e)
            res["end_to_end"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return res


# ---- report ------------------------------------------------------------------------------------
GOAL_EXACT_N, GOAL_ANN_N = 200_000, 1_000_000


def _ok(res: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in (res or {}).get("rows", []) if r.get("status") == "ok"]


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = _ok(res)
    out = []
    ex = next((r for r in rows if r["engine"] == "exact" and r["n"] == GOAL_EXACT_N), None)
    lat = ex["latency"]["B=1"] if ex else {}
    out.append({"goal": f"exact search, {GOAL_EXACT_N:,} items, B=1, within 2x of the bandwidth bound", "target": "bound / p50 >= 0.5",
                "measured": f"{lat['achieved']:.2f} ({lat['p50_ms']:.3g} ms vs bound {lat['bound_ms']:.3g} ms)" if "achieved" in lat else "-",
                "met": (lat["achieved"] >= 0.5) if "achieved" in lat else None})
    big = [r for r in rows if r["n"] == GOAL_ANN_N and r["engine"] != "exact"]
    good = [r for r in big if r["recall@10"] >= 0.95 and r["latency"]["B=1"]["p50_ms"] <= 5.0]
    best = good[0] if good else (max(big, key=lambda r: r["recall@10"]) if big else None)
    out.append({"goal": f"approximate engine at {GOAL_ANN_N:,} items", "target": "recall@10 >= 0.95 and p50 <= 5 ms at B=1",
                "measured": f"{best['config']}: recall {best['recall@10']:.3f}, p50 {best['latency']['B=1']['p50_ms']:.3g} ms" if best else "-",
                "met": bool(good) if big else None})
    comp = [r for r in big if r["params"].get("storage") in ("pq", "sq8", "fp16")]
    small = [r for r in comp if r["resident_mb"] <= 2048]
    c = max(small, key=lambda r: r["recall@10"]) if small else (min(comp, key=lambda r: r["resident_mb"]) if comp else None)
    out.append({"goal": f"compressed option at {GOAL_ANN_N:,} items", "target": "resident memory <= 2 GB (recall stated)",
                "measured": f"{c['config']}: {c['resident_mb']:.0f} MB resident, recall {c['recall@10']:.3f}" if c else "-",
                "met": bool(small) if comp else None})
    return out


def markdown(res: dict[str, Any]) -> list[str]:
    if not res:
        return []
    out = ["## Gallery search engines", "",
           f"Synthetic clustered unit vectors of width {res['dim']} (clap-512: E + 2D), {QUERIES} queries near gallery "
           f"items, k={res['k']}; recall@10 against `exact` on the same queries. 'resident' = RSS growth of a fresh process "
           "that opens the engine and runs the queries: anonymous memory (the engine's index) + mapped file pages (exact: "
           "all of V; approximate engines: the rows they rescored). 'disk' = vectors + engine files. For `exact`, 'of bound' = "
           "the roofline bound of one pass over V / p50, with the DRAM bandwidth probed in this group "
           f"({res.get('bandwidth', {}).get('bandwidth_gbs', float('nan')):.1f} GB/s, 256 MB arrays) or FLOPs / peak.", ""]
    body = []
    for r in res.get("rows", []):
        if r.get("status") != "ok":
            body.append([f"{r['n']:,}", r["config"], "failed", "", "", "", "", "", "", r.get("error", "")[:80]])
            continue
        l1, l16 = r["latency"]["B=1"], r["latency"]["B=16"]
        bnd = f"{l1['achieved']:.2f} / {l16['achieved']:.2f}" if "achieved" in l1 else ""
        body.append([f"{r['n']:,}", r["config"], f"{r['build_s']:.3g}", f"{(r['vectors_bytes'] + r['engine_bytes']) / 2**20:.0f}",
                     f"{r['resident_mb']:.0f} ({r['anon_mb']:.0f} + {r['file_mb']:.0f})", f"{l1['p50_ms']:.3g} / {l1['p99_ms']:.3g}", f"{l16['p50_ms']:.3g} / {l16['p99_ms']:.3g}",
                     f"{l1['qps']:.3g} / {l16['qps']:.3g}", f"{r['recall@10']:.3f}", bnd])
    head = ["N", "engine", "build s", "disk MB", "resident MB (index + mapped V)", "B=1 p50 / p99 ms", "B=16 p50 / p99 ms", "queries/s B=1 / B=16",
            "recall@10", "of bound B=1 / B=16"]  # resident = anon + mapped file
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(b) + " |" for b in body] + [""]
    e2e = res.get("end_to_end")
    if e2e:
        if e2e.get("error"):
            out += [f"AudioSearch end to end: not measured ({e2e['error']})", ""]
        else:
            lat = "; ".join(f"{b}: p50 {v['p50_ms']:.3g} ms, p99 {v['p99_ms']:.3g} ms, {v['qps']:.3g} queries/s" for b, v in e2e["latency"].items())
            out += [f"AudioSearch.search end to end (captions -> tokenizer -> text encoder -> sampler -> exact engine), "
                    f"{e2e['n']:,}-item index (built in {e2e['build_s']} s): {lat}.", ""]
    out += ["| goal | target | measured | |", "|---|---|---|---|"]
    out += [f"| {g['goal']} | {g['target']} | {g['measured']} | {dict([(True, 'met'), (False, '**missed**'), (None, 'not measured')])[g['met']]} |"
            for g in goals(res)] + [""]
    return out


def plot(res: dict[str, Any], path: Path) -> bool:
    """Latency (p50, B=1) against N per engine configuration, log-log."""
    rows = _ok(res)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .harness import save_png

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["config"] for r in rows):
        pts = sorted((r["n"], r["latency"]["B=1"]["p50_ms"]) for r in rows if r["config"] == label)
        ax.plot(*zip(*pts), marker="o", label=label)
    bnd = sorted((r["n"], r["latency"]["B=1"]["bound_ms"]) for r in rows if r["engine"] == "exact" and "bound_ms" in r["latency"]["B=1"])
    if bnd:
        ax.plot(*zip(*bnd), "k--", label="exact: bandwidth bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size N")
    ax.set_ylabel("p50 latency, B=1 (ms)")
    ax.set_title(f"gallery search, k={res['k']}, {res['dim']}-d")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
    return True
