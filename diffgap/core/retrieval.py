"""Retrieval metrics, similarity fusion and paired-bootstrap intervals. numpy only (no torch).

Convention: query i's single relevant gallery item is gallery row i (paired splits). Every metric
is a mean of a per-query quantity computed from the 1-based rank of the relevant item, so
bootstrap resampling works on the rank vector alone.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

KS = (1, 5, 10)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(N, D) x (M, D) -> (N, M) cosine similarities."""
    return l2n(q.astype(np.float32)) @ l2n(g.astype(np.float32)).T


def ranks_of_diagonal(sim: np.ndarray) -> np.ndarray:
    """1-based rank of gallery item i for query i: 1 + #items scored strictly higher. (N,) int.
    Ties count in the query's favour, which only matters for exactly equal scores."""
    pos = np.diagonal(sim)[:, None]
    return 1 + (sim > pos).sum(axis=1)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 and mAP@10 in percent, median rank. One relevant item per query, so
    AP@10 = 1/rank if rank <= 10 else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {f"R@{k}": 100.0 * float(np.mean(r <= k)) for k in KS}
    out["mAP@10"] = 100.0 * float(np.mean(np.where(r <= 10, 1.0 / r, 0.0)))
    out["MedR"] = float(np.median(r))
    return out


def standardize_rows(sim: np.ndarray) -> np.ndarray:
    """Per-query z-scores: makes similarities from different spaces comparable before fusion
    without changing any single matrix's ranking."""
    mu = sim.mean(axis=1, keepdims=True)
    sd = sim.std(axis=1, keepdims=True)
    return (sim - mu) / np.maximum(sd, 1e-12)


def fuse(sims: list[np.ndarray], weights: tuple[float, ...]) -> np.ndarray:
    if len(sims) != len(weights):
        raise ValueError(f"fuse: {len(sims)} similarity matrices but {len(weights)} weights")
    out = np.zeros_like(sims[0], dtype=np.float32)
    for s, w in zip(sims, weights):
        if w:
            out += np.float32(w) * standardize_rows(s).astype(np.float32)
    return out


def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """All non-negative weight vectors of length n summing to 1 on a grid of ``step``."""
    m = int(round(1.0 / step))
    grid = []
    for c in itertools.product(range(m + 1), repeat=n - 1):
        if sum(c) <= m:
            grid.append(tuple(x / m for x in (*c, m - sum(c))))
    return grid


@dataclass
class FusionChoice:
    weights: tuple[float, ...]
    val_r1: float


def choose_fusion_weights(val_sims: list[np.ndarray], step: float = 0.1) -> FusionChoice:
    """Grid-search fusion weights maximising validation R@1 (ties -> higher mAP@10). Never test."""
    z = [standardize_rows(s).astype(np.float32) for s in val_sims]
    best: tuple[float, float, tuple[float, ...]] | None = None
    for w in simplex_grid(len(z), step):
        fused = sum(np.float32(wi) * zi for wi, zi in zip(w, z) if wi)
        m = metrics_from_ranks(ranks_of_diagonal(fused))
        key = (m["R@1"], m["mAP@10"])
        if best is None or key > best[:2]:
            best = (*key, w)
    assert best is not None
    return FusionChoice(weights=best[2], val_r1=best[0])


def bootstrap_ci(
    ranks: np.ndarray, ranks_ref: np.ndarray | None = None, metric: str = "R@1",
    n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric`` (or of its paired difference to ``ranks_ref``: the same
    resampled queries for both systems, so shared query difficulty cancels)."""
    rng = np.random.default_rng(seed)
    n = len(ranks)
    idx = rng.integers(0, n, size=(n_boot, n))
    k = {"R@1": 1, "R@5": 5, "R@10": 10}.get(metric)

    def stat(r: np.ndarray) -> np.ndarray:  # r: (n_boot, n)
        if k is not None:
            return 100.0 * (r <= k).mean(axis=1)
        if metric == "mAP@10":
            return 100.0 * np.where(r <= 10, 1.0 / r, 0.0).mean(axis=1)
        raise ValueError(f"bootstrap_ci: unsupported metric {metric!r}")

    vals = stat(ranks[idx].astype(np.float64))
    if ranks_ref is not None:
        vals = vals - stat(ranks_ref[idx].astype(np.float64))
    lo, hi = np.percentile(vals, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)
