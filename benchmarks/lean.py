"""The ``lean`` group: what skipping the fusion terms of weight 0 saves, both ways measured in one run.

Where validation gives both bridged terms weight 0 (the ``full`` row keeps raw + heads, or the heads
alone), the runtime computes and stores only what a weighted term reads (:mod:`diffgap.runtime.fusion`).
This group exports the run's model with such weights (samplers at K = 1, the retrieval bridge, and
the heads; FP32, no encoders: embeddings in), builds one gallery of N random unit audio embeddings
twice -- the lean index (only the blocks the weights read) and the full one (``all_blocks``: every
block, what indexes held before) -- and times text -> audio queries both ways on the exact engine,
the two taking turns call by call:

* lean: ``AudioSearch.search_embeddings`` (the head alone per query, the lean index);
* full: the sampler per query (``bridge_embeddings``) and the full index (every term computed, the
  zero-weight ones multiplied by 0).

Both give the same scores (up to float32 rounding; the largest top-k difference is recorded).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks")

K = 10
BATCHES = (1, 16)
SIZE, SIZE_QUICK = 100_000, 2_000
QUERIES = 64
# Two shapes of what validation keeps (`diffgap eval --json`'s names): the heads alone, and raw + heads.
WEIGHTS = {
    "heads": {"raw": 0.0, "heads": 1.0, "q-bridge": 0.0, "g-bridge": 0.0},
    "raw+heads": {"raw": 0.5, "heads": 1.0, "q-bridge": 0.0, "g-bridge": 0.0},
}


def _bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _timed(fns: dict[str, Any], queries: np.ndarray, b: int, policy: Any) -> dict[str, dict[str, float]]:
    """Per function: p50/p99 per call and queries/s, cycling through the query pool in batches of ``b``.
    The functions take turns call by call, so a change in the machine's load hits both alike."""
    calls = [queries[i:i + b] for i in range(0, len(queries) - b + 1, b)]
    for fn in fns.values():
        for c in calls[: max(1, policy.warmup)]:
            fn(c)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    t_start = time.perf_counter()
    i = 0
    while True:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(calls[i % len(calls)])
            samples[k].append(time.perf_counter() - t0)
        i += 1
        el = time.perf_counter() - t_start
        if (i >= 3 and el >= 2 * policy.max_time_s) or (i >= max(policy.repeats, 20) and el >= 2 * policy.min_time_s):
            break
    out = {}
    for k, s in samples.items():
        a = np.asarray(s) * 1e3
        out[k] = {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                  "qps": float(b * a.size / (a.sum() / 1e3)), "calls": int(a.size)}
    return out


def one(ctx: Any, label: str, weights: dict[str, float], n: int) -> dict[str, Any]:
    """Lean vs full index and query path for one set of fusion weights (both tasks)."""
    from diffgap.core.manifest import Manifest
    from diffgap.export.cli import export_all
    from diffgap.runtime import AudioSearch, GalleryIndex, build_index
    from diffgap.runtime.fusion import fusion_weights
    from diffgap.runtime.pipeline import TextToAudioBridge
    from diffgap.runtime.search import GallerySearcher

    work = ctx.work / f"lean-{label.replace('+', '-')}"
    shutil.rmtree(work, ignore_errors=True)
    export = export_all(ctx.checkpoint, work / "export", encoders=None, fp16=False, steps=1,
                        fusion_weights={"text_to_audio": weights, "audio_to_text": weights}).out
    man = Manifest.load(export)
    rng = np.random.default_rng(0)
    audio = _unit(rng.standard_normal((n, man.input_dim("audio"))))
    text = _unit(rng.standard_normal((QUERIES, man.input_dim("text"))))
    ids = [f"clip{i:07d}" for i in range(n)]
    row: dict[str, Any] = {"label": label, "weights": fusion_weights(man, None, "text_to_audio"), "n": n, "k": K,
                           "embed_dim": man.input_dim("audio")}
    opts = {"intra_op_threads": ctx.threads}
    for kind, all_blocks in (("lean", False), ("full", True)):
        t = time.perf_counter()
        path = build_index(man, work / f"index-{kind}", audio=audio, ids=ids, all_blocks=all_blocks)
        side = GalleryIndex.load(path).side("audio")
        row[kind] = {"build_s": round(time.perf_counter() - t, 2), "width": int(side.vectors.shape[1]),
                     "spaces": list(side.spaces), "vectors_bytes": int(side.vectors.nbytes), "index_bytes": _bytes(path)}
    w = row["weights"]
    with AudioSearch(work / "index-lean", man, **opts) as lean, TextToAudioBridge(man, **opts) as t2a:
        full = GallerySearcher(GalleryIndex.load(work / "index-full"), "audio", w)
        try:
            def lean_query(q: np.ndarray) -> Any:
                return lean.search_embeddings(q, k=K)

            def full_query(q: np.ndarray) -> Any:
                return full.search(t2a.bridge_embeddings(q), K)

            _, s_lean = lean.search_embeddings(text, k=K)
            _, s_full = full_query(text)
            row["max_abs_score_diff"] = float(np.abs(s_lean - s_full).max())
            for kind in ("lean", "full"):
                row[kind]["latency"] = {}
            for b in BATCHES:
                for kind, lat in _timed({"lean": lean_query, "full": full_query}, text, b, ctx.policy).items():
                    row[kind]["latency"][f"B={b}"] = lat
            row["lean"]["sampler_opened"] = lean.t2a._sampler is not None
        finally:
            full.close()
    shutil.rmtree(work, ignore_errors=True)
    log.info("lean %s N=%d: index %d -> %d bytes, B=1 p50 %.3g -> %.3g ms", label, n, row["full"]["index_bytes"],
             row["lean"]["index_bytes"], row["full"]["latency"]["B=1"]["p50_ms"], row["lean"]["latency"]["B=1"]["p50_ms"])
    return row


def run(ctx: Any, n: int | None = None) -> dict[str, Any]:
    n = n or (SIZE_QUICK if ctx.quick else SIZE)
    rows = []
    for label, w in WEIGHTS.items():
        try:
            rows.append(one(ctx, label, w, n))
        except Exception as e:  # a failure is a recorded result
            log.warning("lean %s not measured: %s: %s", label, type(e).__name__, e)
            rows.append({"label": label, "n": n, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    return {"n": n, "k": K, "queries": QUERIES, "rows": rows}


def markdown(res: dict[str, Any] | None) -> list[str]:
    if not res:
        return []
    out = ["## Pay only for what validation kept", "",
           f"Fusion weights with both bridged terms at 0; {res['n']:,} random unit audio embeddings, {res['queries']} text "
           f"queries, k={res['k']}, exact engine, samplers at K = 1. 'lean': only the gallery blocks and query embeddings a "
           "weighted term reads (the head alone per query, no sampler); 'full': every block and the sampler per query, "
           "the zero-weight terms multiplied by 0. Same scores (largest top-k difference in the last column).", ""]
    head = ["weights kept", "index", "width", "index MB", "build s", "B=1 p50 / p99 ms", "B=16 p50 / p99 ms", "queries/s B=1 / B=16",
            "max score diff"]
    body = []
    for r in res["rows"]:
        if "error" in r:
            body.append([r["label"], "failed", "", "", "", "", "", "", r["error"][:80]])
            continue
        for kind in ("full", "lean"):
            x = r[kind]
            l1, l16 = x["latency"]["B=1"], x["latency"]["B=16"]
            body.append([r["label"], f"{kind} ({'+'.join(x['spaces'])})", str(x["width"]), f"{x['index_bytes'] / 2**20:.1f}",
                         f"{x['build_s']:.3g}", f"{l1['p50_ms']:.3g} / {l1['p99_ms']:.3g}", f"{l16['p50_ms']:.3g} / {l16['p99_ms']:.3g}",
                         f"{l1['qps']:.3g} / {l16['qps']:.3g}", f"{r['max_abs_score_diff']:.1e}" if kind == "lean" else ""])
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(b) + " |" for b in body] + [""]
    return out


def plot(res: dict[str, Any], path: Path) -> bool:
    """Index MB and B=1 p50 latency, full vs lean, per weight set."""
    rows = [r for r in (res or {}).get("rows", []) if "error" not in r]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .harness import save_png

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    x = np.arange(len(rows))
    for i, kind in enumerate(("full", "lean")):
        a1.bar(x + (i - 0.5) * 0.38, [r[kind]["index_bytes"] / 2**20 for r in rows], 0.38, label=kind)
        a2.bar(x + (i - 0.5) * 0.38, [r[kind]["latency"]["B=1"]["p50_ms"] for r in rows], 0.38, label=kind)
    for a, title in ((a1, "index size (MB)"), (a2, "text -> audio query, B=1, p50 (ms)")):
        a.set_xticks(x, [r["label"] for r in rows])
        a.set_xlabel("fusion terms validation kept")
        a.set_title(title)
        a.grid(True, axis="y", alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"zero-weight terms skipped vs computed, N = {res['n']:,}", fontsize=10)
    save_png(fig, path)
    return True
