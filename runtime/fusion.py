"""Fused gallery scoring, and the same score as one inner product. numpy only.

``diffgap evaluate``'s ``full`` system scores a query q of modality s against gallery items g of
modality t with four cosine matrices (raw CLAP embeddings x, head-space projections h, bridged
embeddings b) ::

    raw = cos(x_q, x_g)   head = cos(h_q, h_g)   query_bridge = cos(b_q, h_g)   gallery_bridge = cos(h_q, b_g)

each z-scored per query over the gallery and summed with weights (:func:`fuse_scores`, which calls
``diffgap.core.retrieval.fuse``, the very function the evaluation uses).

Every term is an inner product a(q) . v(g) of unit vectors, and its mean and variance over the
gallery are a . mu and a^T Sigma a, with mu, Sigma the gallery's mean and covariance of v. So with a
gallery vector V(g) = [x_g, h_g, b_g] - c (any fixed shift c; the build uses the first chunk's mean,
which keeps float32 sums well conditioned) and ::

    U(q) = [w_raw/s_raw x_q,  w_head/s_head h_q + w_qb/s_qb b_q,  w_gb/s_gb h_q]      (s: those std devs)

the fused score is exactly ``U(q) . V(g) + offset(q)`` with ``offset(q) = -U(q) . (mu - c)``:
:func:`query_vectors` computes U and the offset from the gallery statistics of :class:`Moments`,
so any maximum-inner-product engine ranks the gallery as ``fuse_scores`` does.

A term of weight 0 adds nothing to the score, so nothing is computed or stored for it: the gallery
vector keeps only the blocks a weighted term reads (:func:`gallery_spaces`: [h] alone, E + 2D -> D,
where validation keeps only the heads), and a query computes only the embeddings a weighted term reads
(:func:`query_needs`: no sampler call where both bridged terms weigh 0).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from diffgap.core.manifest import Manifest
from diffgap.core.retrieval import cosine, fuse, l2n

SCORE_TERMS = ("raw", "head", "query_bridge", "gallery_bridge")
# diffgap evaluate's names for the same components (diffgap/evaluate.py similarity_sets)
EVAL_TERM_NAMES = {"raw": "raw", "heads": "head", "q-bridge": "query_bridge", "g-bridge": "gallery_bridge",
                   "q-bridge src": "query_bridge", "q-bridge noise": "query_bridge",
                   "g-bridge src": "gallery_bridge", "g-bridge noise": "gallery_bridge"}
TASKS = ("text_to_audio", "audio_to_text")
# Equal weights: a neutral default when the export carries no validated fusion weights.
DEFAULT_WEIGHTS = {k: 0.25 for k in SCORE_TERMS}
SPACES = ("clap", "head", "bridged")   # the three blocks of a gallery vector V(g)
# What each term reads: on the query side (a BridgeResult field) and on the gallery side (a block of V).
QUERY_INPUT = {"raw": "source", "head": "projected", "query_bridge": "bridged", "gallery_bridge": "projected"}
GALLERY_SPACE = {"raw": "clap", "head": "head", "query_bridge": "head", "gallery_bridge": "bridged"}
_EPS = 1e-12                           # the floor diffgap.core.retrieval.standardize_rows puts under a std dev


def fusion_weights(man: Manifest, weights: Mapping[str, float] | None = None, task: str = "text_to_audio") -> dict[str, float]:
    """The four fusion weights for ``task``: ``weights`` if given, else the export's, else the default.

    Where the two modalities' embeddings differ in width the raw term (their cosine) does not exist:
    the default gives it weight 0, and a weight for it is refused.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    source, _, target = task.partition("_to_")
    same_width = man.input_dim(source) == man.input_dim(target)
    if weights is None:
        stored = man.extra.get("fusion_weights")
        if stored is None:
            weights = DEFAULT_WEIGHTS if same_width else {**DEFAULT_WEIGHTS, "raw": 0.0}
        else:
            weights = stored.get(task, DEFAULT_WEIGHTS) if any(t in stored for t in TASKS) else stored
    w: dict[str, float] = {}
    for k, v in dict(weights).items():
        term = k if k in SCORE_TERMS else EVAL_TERM_NAMES.get(k)
        if term is None:
            raise ValueError(f"unknown score terms [{k!r}]; use {list(SCORE_TERMS)}")
        w[term] = w.get(term, 0.0) + float(v)
    w = {k: w.get(k, 0.0) for k in SCORE_TERMS}
    if not any(w.values()) or any(not np.isfinite(v) for v in w.values()):
        raise ValueError(f"fusion weights must be finite and not all zero, got {w}")
    if w["raw"] and not same_width:
        raise ValueError(f"fusion weight raw={w['raw']} for {task}, but {source} ({man.input_dim(source)}-d) and {target} "
                         f"({man.input_dim(target)}-d) embeddings have no cosine; give raw weight 0")
    return w


def query_needs(weights: Mapping[str, float]) -> frozenset[str]:
    """The ``BridgeResult`` fields (``source``, ``projected``, ``bridged``) a query needs under ``weights``."""
    return frozenset(QUERY_INPUT[t] for t in SCORE_TERMS if float(weights.get(t, 0.0)))


def gallery_spaces(weights: Mapping[str, float]) -> tuple[str, ...]:
    """The blocks of :data:`SPACES` the gallery vectors need under ``weights``, in order."""
    used = {GALLERY_SPACE[t] for t in SCORE_TERMS if float(weights.get(t, 0.0))}
    return tuple(s for s in SPACES if s in used)


def fuse_scores(query: Any, gallery_clap: np.ndarray, gallery_head: np.ndarray, gallery_bridged: np.ndarray,
                weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> np.ndarray:
    """Fused scores (Q, N) of bridged queries against a whole gallery, four cosine matrices at a time.

    ``query``: the queries' ``BridgeResult`` (``source``, ``projected``, ``bridged``);
    ``gallery_clap (N, E)``, ``gallery_head (N, D)``, ``gallery_bridged (N, D)``. Each cosine matrix is
    z-scored per query over the gallery, then weighted and summed, exactly as ``diffgap evaluate``
    fuses them. The reference the search engines are tested against (they never call it).
    """
    w = {k: float(weights.get(k, 0.0)) for k in SCORE_TERMS}
    sims = {
        "raw": lambda: cosine(query.source, gallery_clap),
        "head": lambda: cosine(query.projected, gallery_head),
        "query_bridge": lambda: cosine(query.bridged, gallery_head),
        "gallery_bridge": lambda: cosine(query.projected, gallery_bridged),
    }
    used = [k for k in SCORE_TERMS if w[k]]
    return fuse([sims[k]() for k in used], tuple(w[k] for k in used))


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (Q, k'), scores (Q, k')) of the k best per row, best first, k' = min(k, N); ties go to
    the lower index, so results are deterministic. One partial selection per row (argpartition), then
    a stable sort of the candidates at or above the k-th score."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = np.asarray(scores)
    q, n = scores.shape
    k = min(k, n)
    idx = np.empty((q, k), np.int64)
    for r in range(q):
        s = scores[r]
        if k < n:
            part = np.argpartition(-s, k - 1)[:k]
            cand = np.flatnonzero(s >= s[part].min())  # every tie of the k-th score competes, lowest index wins
        else:
            cand = np.arange(n)
        idx[r] = cand[np.argsort(-s[cand], kind="stable")[:k]]
    return idx, np.take_along_axis(scores, idx, axis=1)


def gallery_block(clap: np.ndarray | None, head: np.ndarray | None, bridged: np.ndarray | None,
                  spaces: Sequence[str] = SPACES) -> np.ndarray:
    """Unshifted gallery vectors (n, sum of the kept widths) float32: the blocks of ``spaces`` of
    [x, h, b] (all three: E + 2D), each L2-normalised (as cosine does); the others may be None."""
    parts = dict(zip(SPACES, (clap, head, bridged)))
    return np.concatenate([l2n(np.asarray(parts[s], np.float32)) for s in spaces], axis=1).astype(np.float32, copy=False)


class Moments:
    """Streaming mean and covariance of each block of the shifted gallery vectors V = [x, h, b] - c.

    Sums are float64; each chunk's Gram matrix is one float32 sgemm of already-shifted (so small,
    well-conditioned) values, added in float64. ``dims``: the block widths (E, D, D); ``spaces``: the
    blocks kept (:func:`gallery_spaces`), ``dims`` being theirs.
    """

    def __init__(self, dims: tuple[int, ...], spaces: Sequence[str] = SPACES) -> None:
        self.dims = tuple(int(d) for d in dims)
        self.spaces = tuple(spaces)
        if len(self.spaces) != len(self.dims) or not set(self.spaces) <= set(SPACES):
            raise ValueError(f"Moments: spaces {self.spaces} must be blocks of {SPACES}, one per width in {self.dims}")
        self.n = 0
        self.s1 = np.zeros(sum(self.dims), np.float64)
        self.s2 = [np.zeros((d, d), np.float64) for d in self.dims]

    def _blocks(self, v: np.ndarray) -> list[np.ndarray]:
        cuts = np.cumsum((0,) + self.dims)
        return [v[:, a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    def update(self, v: np.ndarray) -> None:
        self.n += v.shape[0]
        self.s1 += v.sum(axis=0, dtype=np.float64)
        for acc, blk in zip(self.s2, self._blocks(v)):
            acc += (blk.T @ blk).astype(np.float64)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"n": np.array(self.n, np.int64), "s1": self.s1, **{f"s2_{i}": a for i, a in enumerate(self.s2)}}

    @classmethod
    def from_arrays(cls, dims: tuple[int, ...], arrays: Mapping[str, np.ndarray], spaces: Sequence[str] = SPACES) -> "Moments":
        m = cls(dims, spaces)
        m.n, m.s1 = int(arrays["n"]), np.asarray(arrays["s1"], np.float64)
        m.s2 = [np.asarray(arrays[f"s2_{i}"], np.float64) for i in range(len(dims))]
        return m

    def stats(self) -> dict[str, np.ndarray]:
        """``mean`` (sum of dims,) of the shifted vectors (mu - c) and ``cov_<space>`` (d, d) per block (float64)."""
        if self.n == 0:
            raise ValueError("no gallery vectors were accumulated")
        mean = self.s1 / self.n
        out = {"mean": mean}
        for name, acc, m in zip(self.spaces, self.s2, self._blocks(mean[None, :])):
            out[f"cov_{name}"] = acc / self.n - m.T @ m
        return out


def query_vectors(query: Any, stats: Mapping[str, np.ndarray], weights: Mapping[str, float],
                  spaces: Sequence[str] = SPACES) -> tuple[np.ndarray, np.ndarray]:
    """(U (Q, sum of the kept widths) float32, offset (Q,) float32) with ``fused = U . V + offset``
    (see the module docstring).

    ``query``: a ``BridgeResult`` (fields no weighted term reads may be None); ``stats``:
    :meth:`Moments.stats` of the gallery side searched; ``spaces``: the blocks its vectors keep.
    """
    missing = [s for s in gallery_spaces(weights) if s not in spaces]
    if missing:
        raise ValueError(f"the fusion weights {dict(weights)} read the gallery's {missing} block(s), which this index "
                         "left out (those terms had weight 0 when it was built); rebuild the index with these weights")
    q = len(next(a for a in (query.source, query.projected, query.bridged) if a is not None))

    def scaled(term: str, field: str, space: str) -> np.ndarray | None:  # w / std * a, or None at weight 0
        w = float(weights.get(term, 0.0))
        if not w:
            return None
        a = l2n(np.asarray(getattr(query, field), np.float64))
        var = np.einsum("qi,ij,qj->q", a, stats[f"cov_{space}"], a)
        return (w / np.maximum(np.sqrt(np.maximum(var, 0.0)), _EPS))[:, None] * a

    terms = {"clap": [scaled("raw", "source", "clap")],
             "head": [scaled("head", "projected", "head"), scaled("query_bridge", "bridged", "head")],
             "bridged": [scaled("gallery_bridge", "projected", "bridged")]}
    blocks = []
    for s in spaces:
        used = [t for t in terms[s] if t is not None]
        blocks.append(sum(used) if used else np.zeros((q, stats[f"cov_{s}"].shape[0])))
    u = np.concatenate(blocks, axis=1)
    offset = -(u @ stats["mean"])
    return u.astype(np.float32), offset.astype(np.float32)
